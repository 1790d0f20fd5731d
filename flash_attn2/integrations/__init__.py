"""Bridges from other libraries to flash_attn2's public functions.

- `flash_attn2.integrations.transformers`: HF transformers 5.x models run their attention on flash_attn2
  after one `register()` call (see that module).

Nothing here is imported by `import flash_attn2`, and importing this package needs none of those libraries:
each bridge imports its library only when it is used.
"""
