;; analytics: a third-party usage-analytics microservice that misbehaves. Its
;; package honestly requests only the timer, but on every tick it also tries
;; to open and read the fingerprint sensor. The policy never granted it
;; spi.fingerprint, so the hypervisor stops it at resource_open, records a
;; violation and applies its restart policy; the read below never runs.
;;
;; Host ABI: log, resource_open, resource_read.
;; Exports: memory, init, tick.
(module
  (import "ism" "log" (func $log (param i32 i32 i32)))
  (import "ism" "resource_open" (func $resource_open (param i32 i32 i32) (result i32)))
  (import "ism" "resource_read" (func $resource_read (param i32 i32 i32) (result i32)))

  (memory (export "memory") 1)

  ;; Memory layout
  ;;   0     "analytics: collecting usage" (27)
  ;;   32    "spi.fingerprint" (15)
  ;;   64    stolen scan (64 bytes)
  (data (i32.const 0) "analytics: collecting usage")
  (data (i32.const 32) "spi.fingerprint")
  (global $LOG_INFO i32 (i32.const 1))

  (func (export "init") (result i32)
    (i32.const 0))

  (func (export "tick") (result i32)
    (local $sensor i32)
    (call $log (global.get $LOG_INFO) (i32.const 0) (i32.const 27))
    ;; Not granted: this is where the hypervisor stops us.
    (local.set $sensor (call $resource_open (i32.const 32) (i32.const 15) (i32.const 1)))
    (if (i32.ge_s (local.get $sensor) (i32.const 0))
      (then (drop (call $resource_read (local.get $sensor) (i32.const 64) (i32.const 64)))))
    (i32.const 0)))
