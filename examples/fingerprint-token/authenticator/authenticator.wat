;; authenticator: holds the right to use the device's 2FA key ("device-2fa")
;; and signs a 32-byte server challenge only after biometric confirms, through
;; the gateway biometric.verify, that the finger on the sensor is the enrolled
;; one. It never sees the sensor or the template.
;;
;; The key lives in the crypto service: it is opened once at init (created on
;; first open, as the policy's key grant says) and used through an opaque
;; handle; the private key never enters this module.
;;
;; Host ABI: gateway_call, key_open, key_sign.
;; Exports: memory, init, gateway_buffer, op_sign.
;;
;; op_sign(challenge[32]) replies, in the gateway buffer:
;;   [0] + 64-byte signature (ECDSA P-256 over SHA-256(challenge), raw r||s)
;;   [1] no match   [2] no finger   [3] not enrolled   [4] biometric unavailable
;; A request that is not 32 bytes, or a failed signature, is refused with a
;; negative value (the caller receives ISM_EREFUSED).
(module
  (import "ism" "gateway_call"
    (func $gateway_call (param i32 i32 i32 i32 i32 i32) (result i32)))
  (import "ism" "key_open"
    (func $key_open (param i32 i32) (result i32)))
  (import "ism" "key_sign"
    (func $key_sign (param i32 i32 i32 i32 i32) (result i32)))

  (memory (export "memory") 1)

  ;; Memory layout
  ;;   0     "biometric.verify" (16 bytes)
  ;;   32    "device-2fa" (10 bytes)
  ;;   64    copy of the challenge (32 bytes)
  ;;   128   biometric.verify reply buffer (16 bytes)
  ;;   1024  gateway buffer (4096 bytes); the signature is written at 1025
  (data (i32.const 0) "biometric.verify")
  (data (i32.const 32) "device-2fa")
  (global $VERIFY i32 (i32.const 0))
  (global $VERIFY_LEN i32 (i32.const 16))
  (global $KEY i32 (i32.const 32))
  (global $KEY_LEN i32 (i32.const 10))
  (global $CHALLENGE i32 (i32.const 64))
  (global $VERDICT i32 (i32.const 128))
  (global $VERDICT_CAP i32 (i32.const 16))
  (global $GW i32 (i32.const 1024))

  (global $CHALLENGE_LEN i32 (i32.const 32))
  (global $key (mut i32) (i32.const 0))
  (global $SIG_LEN i32 (i32.const 64))

  (func $reply (param $status i32) (result i32)
    (i32.store8 (global.get $GW) (local.get $status))
    (i32.const 1))

  (func (export "gateway_buffer") (result i32)
    (global.get $GW))

  ;; Opens the 2FA key: a negative result (e.g. the key store is unavailable) fails the start.
  (func (export "init") (result i32)
    (global.set $key (call $key_open (global.get $KEY) (global.get $KEY_LEN)))
    (select (i32.const 0) (global.get $key) (i32.gt_s (global.get $key) (i32.const 0))))

  ;; Gateway operation "sign".
  (func (export "op_sign") (param $req i32) (param $len i32) (result i32)
    (local $n i32)
    (local $verdict i32)
    (if (i32.ne (local.get $len) (global.get $CHALLENGE_LEN))
      (then (return (i32.const -1))))
    ;; Copy the challenge out of the gateway buffer before the nested call.
    (i64.store offset=0  (global.get $CHALLENGE) (i64.load offset=0  (local.get $req)))
    (i64.store offset=8  (global.get $CHALLENGE) (i64.load offset=8  (local.get $req)))
    (i64.store offset=16 (global.get $CHALLENGE) (i64.load offset=16 (local.get $req)))
    (i64.store offset=24 (global.get $CHALLENGE) (i64.load offset=24 (local.get $req)))
    ;; Ask biometric whether the finger on the sensor is the enrolled one.
    (local.set $n
      (call $gateway_call
        (global.get $VERIFY) (global.get $VERIFY_LEN)
        (i32.const 0) (i32.const 0)
        (global.get $VERDICT) (global.get $VERDICT_CAP)))
    (if (i32.lt_s (local.get $n) (i32.const 1))
      (then (return (call $reply (i32.const 4)))))
    (local.set $verdict (i32.load8_u (global.get $VERDICT)))
    (if (i32.eq (local.get $verdict) (i32.const 1))
      (then
        ;; Match: sign the challenge straight into the reply, after the status byte.
        (local.set $n
          (call $key_sign
            (global.get $key)
            (global.get $CHALLENGE) (global.get $CHALLENGE_LEN)
            (i32.add (global.get $GW) (i32.const 1)) (global.get $SIG_LEN)))
        (if (i32.ne (local.get $n) (global.get $SIG_LEN))
          (then (return (select (local.get $n) (i32.const -1) (i32.lt_s (local.get $n) (i32.const 0))))))
        (i32.store8 (global.get $GW) (i32.const 0))
        (return (i32.add (global.get $SIG_LEN) (i32.const 1)))))
    ;; biometric's verdicts 0 / 2 / 3 map to our statuses 1 / 2 / 3.
    (if (i32.eqz (local.get $verdict))
      (then (return (call $reply (i32.const 1)))))
    (if (i32.le_u (local.get $verdict) (i32.const 3))
      (then (return (call $reply (local.get $verdict)))))
    ;; Anything else is not an answer biometric gives.
    (call $reply (i32.const 4))))
