;; hello: the smallest microservice. It logs one line when the supervisor
;; calls its `init` export. Host ABI: docs in src/ism/formats/abi.py.
(module
  (import "ism" "log" (func $log (param i32 i32 i32)))
  (memory (export "memory") 1)
  (data (i32.const 16) "hello from a signed microservice")
  (func (export "init") (result i32)
    (call $log (i32.const 1) (i32.const 16) (i32.const 32))
    (i32.const 0)))
