"""The ``ism`` command: parses arguments, calls the library, prints."""
