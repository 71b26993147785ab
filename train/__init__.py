"""Stage 2: continual pre-training on megatron-core (needs the ``train`` extra).

``longattn.cli.train`` is the entry point (``longattn-train``); only ``train.megatron_backend`` (and the CPU
debugging aid ``train.cpu_compat``) import megatron-core, so ``train.config`` and ``train.convert`` load without it.
"""
