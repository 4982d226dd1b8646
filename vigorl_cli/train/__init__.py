"""Training: the SFT loop (``sft.py``) and the pieces GRPO reuses.

* ``batching``   : conversations → token ids, assistant-only targets, images; padded or padding-free (packed)
                   micro-batches with per-segment M-RoPE positions; :class:`LogProbModel`, the chunked per-token
                   log-prob forward every loss is built on.
* ``parallel``   : single process / FSDP2 / DeepSpeed behind one small interface (``setup``, ``wrap``, ``teardown``).
* ``checkpoint`` : HF folders (``save_pretrained`` + processor) and resumable training state, written atomically.
* ``metrics``    : one logger protocol (JSONL always; TensorBoard and W&B when asked).

Modules are imported lazily by their users (torch and transformers are heavy).
"""
