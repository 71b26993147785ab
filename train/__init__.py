"""Stage 2: continual pre-training on megatron-core (needs the ``train`` extra). Built in a later issue."""
