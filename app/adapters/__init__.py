"""LoRA adapters beside one base model, chosen per request and mixed in one step.

- `names.py`: what an adapter may be called, and `PALIGEMMA_ADAPTERS` parsed (pure, no torch).
- `folder.py`: a PEFT adapter folder read and checked by PEFT's own config and loading code.
- `lora_linear.py`: the linear layer that adds each row's adapter delta, and the routing the runner sets.
- `bank.py`: the stacked, rank-padded weights of every slot, the wrapped layers, slot writes.
- `registry.py`: names -> slots, requests holding an adapter, loading and unloading at run time.
"""
