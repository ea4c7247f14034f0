"""The ``ldm`` command: one module per command family (generate, info, train_lora) over the
pipelines and training packages, which it imports only inside its handlers."""
