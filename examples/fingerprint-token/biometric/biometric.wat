;; biometric: the only microservice that can touch the fingerprint sensor.
;; It enrols one finger and keeps its 64-byte template in its own secure
;; storage (record uid 1: encrypted under a key only biometric's namespace
;; derives, bound to its UUID, replay-protected), so the template survives
;; restarts and reboots; it answers "does the finger on the sensor match?" for
;; the gateway callers the policy names. The template never leaves biometric.
;;
;; Host ABI: resource_open, resource_read, storage_get, storage_set.
;; Exports: memory, init, gateway_buffer, op_enroll, op_verify.
;;
;; Reply (one byte, written at the start of the gateway buffer):
;;   enroll: 0 enrolled, 2 no finger, 3 already enrolled
;;   verify: 1 match, 0 no match, 2 no finger, 3 not enrolled
;; A sensor error other than "no finger" is returned as a negative value
;; (the caller receives ISM_EREFUSED).
(module
  (import "ism" "resource_open" (func $resource_open (param i32 i32 i32) (result i32)))
  (import "ism" "resource_read" (func $resource_read (param i32 i32 i32) (result i32)))
  (import "ism" "storage_get" (func $storage_get (param i64 i32 i32 i32) (result i32)))
  (import "ism" "storage_set" (func $storage_set (param i64 i32 i32 i32) (result i32)))

  (memory (export "memory") 1)

  ;; Memory layout
  ;;   0     "spi.fingerprint" (15 bytes)
  ;;   64    enrolled template (64 bytes)
  ;;   128   current scan (64 bytes)
  ;;   1024  gateway buffer (4096 bytes)
  (data (i32.const 0) "spi.fingerprint")
  (global $NAME i32 (i32.const 0))
  (global $NAME_LEN i32 (i32.const 15))
  (global $TEMPLATE i32 (i32.const 64))
  (global $SCAN i32 (i32.const 128))
  (global $GW i32 (i32.const 1024))

  (global $SCAN_BYTES i32 (i32.const 64))
  (global $MODE_READ_CONTROL i32 (i32.const 5))
  (global $EAGAIN i32 (i32.const -5))
  ;; Largest Hamming distance (of 512 bits) still accepted as the same finger.
  (global $MAX_DISTANCE i32 (i32.const 24))

  (global $sensor (mut i32) (i32.const -1))
  ;; Storage record holding the enrolled template.
  (global $TEMPLATE_UID i64 (i64.const 1))

  ;; Loads the template from storage into $TEMPLATE; 1 when a full template is enrolled.
  (func $load_template (result i32)
    (i32.eq
      (call $storage_get (global.get $TEMPLATE_UID) (i32.const 0) (global.get $TEMPLATE) (global.get $SCAN_BYTES))
      (global.get $SCAN_BYTES)))

  ;; Writes the one-byte reply `status` into the gateway buffer; returns its length.
  (func $reply (param $status i32) (result i32)
    (i32.store8 (global.get $GW) (local.get $status))
    (i32.const 1))

  (func (export "gateway_buffer") (result i32)
    (global.get $GW))

  ;; Opens the sensor for read|control. A negative handle is returned as is
  ;; (init < 0 is a fault).
  (func (export "init") (result i32)
    (global.set $sensor
      (call $resource_open (global.get $NAME) (global.get $NAME_LEN) (global.get $MODE_READ_CONTROL)))
    (if (result i32) (i32.lt_s (global.get $sensor) (i32.const 0))
      (then (global.get $sensor))
      (else (i32.const 0))))

  ;; Gateway operation "enroll": scans the finger on the sensor as the template.
  (func (export "op_enroll") (param $req i32) (param $len i32) (result i32)
    (local $n i32)
    (if (call $load_template)
      (then (return (call $reply (i32.const 3)))))
    (local.set $n
      (call $resource_read (global.get $sensor) (global.get $TEMPLATE) (global.get $SCAN_BYTES)))
    (if (i32.eq (local.get $n) (global.get $EAGAIN))
      (then (return (call $reply (i32.const 2)))))
    (if (i32.lt_s (local.get $n) (i32.const 0))
      (then (return (local.get $n))))
    (if (i32.ne (local.get $n) (global.get $SCAN_BYTES))
      (then (return (i32.const -1))))
    ;; Keep the template in secure storage; a storage error is returned as is.
    (local.set $n
      (call $storage_set (global.get $TEMPLATE_UID) (global.get $TEMPLATE) (global.get $SCAN_BYTES) (i32.const 0)))
    (if (i32.lt_s (local.get $n) (i32.const 0))
      (then (return (local.get $n))))
    (call $reply (i32.const 0)))

  ;; Gateway operation "verify": scans the finger and compares it with the
  ;; template by Hamming distance over eight 64-bit words.
  (func (export "op_verify") (param $req i32) (param $len i32) (result i32)
    (local $n i32)
    (local $off i32)
    (local $distance i64)
    (if (i32.eqz (call $load_template))
      (then (return (call $reply (i32.const 3)))))
    (local.set $n
      (call $resource_read (global.get $sensor) (global.get $SCAN) (global.get $SCAN_BYTES)))
    (if (i32.eq (local.get $n) (global.get $EAGAIN))
      (then (return (call $reply (i32.const 2)))))
    (if (i32.lt_s (local.get $n) (i32.const 0))
      (then (return (local.get $n))))
    (if (i32.ne (local.get $n) (global.get $SCAN_BYTES))
      (then (return (i32.const -1))))
    (loop $words
      (local.set $distance
        (i64.add (local.get $distance)
          (i64.popcnt
            (i64.xor
              (i64.load (i32.add (global.get $TEMPLATE) (local.get $off)))
              (i64.load (i32.add (global.get $SCAN) (local.get $off)))))))
      (local.set $off (i32.add (local.get $off) (i32.const 8)))
      (br_if $words (i32.lt_u (local.get $off) (global.get $SCAN_BYTES))))
    (call $reply
      (i64.le_u (local.get $distance) (i64.extend_i32_u (global.get $MAX_DISTANCE))))))
