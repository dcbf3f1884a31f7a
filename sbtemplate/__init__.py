"""Reusable pieces of the SpeechBrain multi-GPU recipe template.

The top-level scripts (finetune.py, single_node_pretrained.py,
multisource_mini_recipe.py) read as recipes; what they share lives here.
"""
