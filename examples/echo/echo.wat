;; echo: answers gateway calls by copying the request into the reply and
;; logging who called (the iSM tells the callee its caller's verified UUID).
(module
  (import "ism" "caller_id" (func $caller (param i32) (result i32)))
  (import "ism" "log" (func $log (param i32 i32 i32)))
  (memory (export "memory") 1)
  (data (i32.const 0) "echo: called")
  ;; gateway operation "echo": request at (ptr,len), reply written at ptr too.
  (func (export "op_echo") (param $ptr i32) (param $len i32) (result i32)
    (drop (call $caller (i32.const 32)))
    (call $log (i32.const 0) (i32.const 0) (i32.const 12))
    (local.get $len)))
