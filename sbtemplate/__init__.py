"""Reusable pieces of the SpeechBrain multi-GPU recipe template.

The top-level scripts (finetune.py, single_node_pretrained.py,
multisource_mini_recipe.py) read as recipes; what they share lives here.

Importing the package sets the OpenMP wait policy to PASSIVE unless the
environment already sets one: on a shared machine, threads that spin-wait
for each other stall whenever another process holds one of their cores
(``python -m sbtemplate.benchmarks.busy_machine`` measures it). The price is
paid on an idle machine by many small operations on several threads, which
each wake sleeping threads: decoding on two threads is then slower than on
one (docs/benchmarks.md, threads in decoding). The OpenMP runtime reads the
variable once, when torch is first imported, so the scripts import this
package before torch.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
