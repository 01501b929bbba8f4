"""A file fuzzer for edgellm's readers (issue 13): mutated GGUF and safetensors files, each
opened (inspect + load + one token, or inspect + convert + load + one token) in a worker
subprocess with a timeout. ``python -m tests.fuzz.run --cases 1000``; a short form runs in the
unit tier (tests/test_fuzz_short.py)."""
