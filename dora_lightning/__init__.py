"""dora-lightning: DoRA pretraining of ViT image encoders from long unlabelled videos, with plugin evaluators.

Importing the package registers one exit hook that destroys an initialised ``torch.distributed`` process group, so
CPU (gloo) DDP processes, including spawned ones, exit cleanly (see :mod:`dora_lightning.distributed`); it imports
nothing heavy (``dora --help`` runs without torch).
"""

from dora_lightning.distributed import destroy_process_group_at_exit

destroy_process_group_at_exit()
