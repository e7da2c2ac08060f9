;; link: the token's side of the serial link to the host computer. It turns
;; UART frames into gateway calls and shows the result on the LED. It may ask
;; biometric to enrol and authenticator to sign, but it can touch neither the
;; sensor nor the key.
;;
;; Host ABI: resource_open, resource_read, resource_write, gateway_call.
;; Exports: memory, init, event.
;;
;; Protocol (one frame per UART read, at most 64 bytes; byte 0 is the command):
;;   host "E"                -> [0x45, status]            biometric.enroll
;;   host "C" + 32 bytes     -> [0x43, status (+ 64-byte signature if status 0)]
;;                                                         authenticator.sign
;;   anything else           -> [0x3F]                     '?'
;; When the gateway call itself fails (negative error e), status is
;; 0xF0 | (-e & 0x0F); an empty reply is 0xF0. The LED is switched on after a
;; signature and off after any failed "C".
(module
  (import "ism" "resource_open" (func $resource_open (param i32 i32 i32) (result i32)))
  (import "ism" "resource_read" (func $resource_read (param i32 i32 i32) (result i32)))
  (import "ism" "resource_write" (func $resource_write (param i32 i32 i32) (result i32)))
  (import "ism" "gateway_call"
    (func $gateway_call (param i32 i32 i32 i32 i32 i32) (result i32)))

  (memory (export "memory") 1)

  ;; Memory layout
  ;;   0     "uart.host" (9)
  ;;   16    "gpio.led0" (9)
  ;;   32    "biometric.enroll" (16)
  ;;   64    "authenticator.sign" (18)
  ;;   128   received frame (64 bytes)
  ;;   512   transmit frame: command byte at 512, gateway reply from 513 (cap 128)
  ;;   768   LED state byte
  (data (i32.const 0) "uart.host")
  (data (i32.const 16) "gpio.led0")
  (data (i32.const 32) "biometric.enroll")
  (data (i32.const 64) "authenticator.sign")
  (global $UART_NAME i32 (i32.const 0))
  (global $LED_NAME i32 (i32.const 16))
  (global $ENROLL i32 (i32.const 32))
  (global $ENROLL_LEN i32 (i32.const 16))
  (global $SIGN i32 (i32.const 64))
  (global $SIGN_LEN i32 (i32.const 18))
  (global $RX i32 (i32.const 128))
  (global $RX_CAP i32 (i32.const 64))
  (global $TX i32 (i32.const 512))
  (global $REPLY i32 (i32.const 513))
  (global $REPLY_CAP i32 (i32.const 128))
  (global $LED_BYTE i32 (i32.const 768))

  (global $EAGAIN i32 (i32.const -5))
  (global $CMD_ENROLL i32 (i32.const 0x45))     ;; 'E'
  (global $CMD_CHALLENGE i32 (i32.const 0x43))  ;; 'C'
  (global $CMD_UNKNOWN i32 (i32.const 0x3F))    ;; '?'
  (global $CHALLENGE_LEN i32 (i32.const 32))
  ;; Frames handled per event; anything left waits for the next event.
  (global $MAX_FRAMES i32 (i32.const 16))

  (global $uart (mut i32) (i32.const -1))
  (global $led (mut i32) (i32.const -1))

  (func (export "init") (result i32)
    (global.set $uart (call $resource_open (global.get $UART_NAME) (i32.const 9) (i32.const 3)))
    (if (i32.lt_s (global.get $uart) (i32.const 0))
      (then (return (global.get $uart))))
    (global.set $led (call $resource_open (global.get $LED_NAME) (i32.const 9) (i32.const 2)))
    (if (i32.lt_s (global.get $led) (i32.const 0))
      (then (return (global.get $led))))
    (i32.const 0))

  ;; Status byte for a gateway_call result n: the reply's first byte, or
  ;; 0xF0 | (-n & 0x0F) for an error (0xF0 for an empty reply).
  (func $status (param $n i32) (result i32)
    (if (result i32) (i32.gt_s (local.get $n) (i32.const 0))
      (then (i32.load8_u (global.get $REPLY)))
      (else
        (i32.or (i32.const 0xF0)
          (i32.and (i32.sub (i32.const 0) (local.get $n)) (i32.const 0x0F))))))

  (func $send (param $ptr i32) (param $len i32)
    (drop (call $resource_write (global.get $uart) (local.get $ptr) (local.get $len))))

  (func $set_led (param $on i32)
    (i32.store8 (global.get $LED_BYTE) (local.get $on))
    (drop (call $resource_write (global.get $led) (global.get $LED_BYTE) (i32.const 1))))

  ;; "E": enrol the finger on the sensor.
  (func $enroll
    (local $n i32)
    (local.set $n
      (call $gateway_call
        (global.get $ENROLL) (global.get $ENROLL_LEN)
        (i32.const 0) (i32.const 0)
        (global.get $REPLY) (global.get $REPLY_CAP)))
    (i32.store8 (global.get $TX) (global.get $CMD_ENROLL))
    (i32.store8 (global.get $REPLY) (call $status (local.get $n)))
    (call $send (global.get $TX) (i32.const 2)))

  ;; "C" + challenge: ask authenticator to sign; forward its whole reply.
  (func $challenge
    (local $n i32)
    (local.set $n
      (call $gateway_call
        (global.get $SIGN) (global.get $SIGN_LEN)
        (i32.add (global.get $RX) (i32.const 1)) (global.get $CHALLENGE_LEN)
        (global.get $REPLY) (global.get $REPLY_CAP)))
    (i32.store8 (global.get $TX) (global.get $CMD_CHALLENGE))
    (if (i32.gt_s (local.get $n) (i32.const 0))
      (then
        (call $send (global.get $TX) (i32.add (local.get $n) (i32.const 1)))
        (call $set_led (i32.eqz (i32.load8_u (global.get $REPLY)))))
      (else
        (i32.store8 (global.get $REPLY) (call $status (local.get $n)))
        (call $send (global.get $TX) (i32.const 2))
        (call $set_led (i32.const 0)))))

  ;; The UART has data: handle each frame until none is left (or MAX_FRAMES).
  ;; Returns 0, or the UART's error when reading fails other than "no data".
  (func (export "event") (param $handle i32) (result i32)
    (local $n i32)
    (local $cmd i32)
    (local $frames i32)
    (block $done
      (loop $next
        (br_if $done (i32.ge_u (local.get $frames) (global.get $MAX_FRAMES)))
        (local.set $n
          (call $resource_read (global.get $uart) (global.get $RX) (global.get $RX_CAP)))
        (br_if $done (i32.eq (local.get $n) (global.get $EAGAIN)))
        (if (i32.lt_s (local.get $n) (i32.const 0))
          (then (return (local.get $n))))
        (local.set $frames (i32.add (local.get $frames) (i32.const 1)))
        (br_if $next (i32.eqz (local.get $n)))
        (local.set $cmd (i32.load8_u (global.get $RX)))
        (if (i32.and
              (i32.eq (local.get $cmd) (global.get $CMD_ENROLL))
              (i32.eq (local.get $n) (i32.const 1)))
          (then (call $enroll) (br $next)))
        (if (i32.and
              (i32.eq (local.get $cmd) (global.get $CMD_CHALLENGE))
              (i32.eq (local.get $n) (i32.add (global.get $CHALLENGE_LEN) (i32.const 1))))
          (then (call $challenge) (br $next)))
        (i32.store8 (global.get $TX) (global.get $CMD_UNKNOWN))
        (call $send (global.get $TX) (i32.const 1))
        (br $next)))
    (i32.const 0))
)
