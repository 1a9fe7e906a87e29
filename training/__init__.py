"""The training library behind ``train.py``: optax + orbax training with token reduction in the loop, on a JAX mesh.

* :mod:`training.builders`: the model and its reduction specs from a config, weights from another run;
* :mod:`training.optim`: AdamW, warm-up + cosine, clipping, frozen / trainable parameters;
* :mod:`training.tasks`: the loss and metrics of a batch (classification, VQA; learned reducers' losses added generically);
* :mod:`training.steps`: the jitted, donated train and eval steps;
* :mod:`training.mesh`: multi-host start-up, the ``"data"`` mesh, replicated or FSDP shardings;
* :mod:`training.checkpoints`: Orbax checkpoints with an integrity fingerprint and fallback;
* :mod:`training.resume`: the config check on resume, ``config.json`` kept, ``metrics.jsonl`` cut back;
* :mod:`training.trainer`: the :class:`Trainer` loop (metrics, evaluation, progress, TensorBoard).
"""

from training.builders import (attach_atp_from_config, build_model, build_vlm, check_atp_kind, compute_dtype,
                               layer_reducers, load_params_from_run, param_paths, reduction_spec,
                               reduction_spec_vlm, resolve_learned_trainable)
from training.checkpoints import Checkpoints
from training.errors import CheckpointError, ConfigMismatchError, NonFiniteLossError, TrainingInterrupted
from training.mesh import make_mesh, maybe_initialize_distributed, state_shardings
from training.optim import build_optimizer, learning_rate_schedule, lr_scale_pairs, trainable_labels
from training.steps import make_eval_step, make_train_step
from training.tasks import ClassificationTask, VQATask, make_task, reducer_terms
from training.trainer import TRANSFER_GUARDS, TensorBoardWriter, Trainer, open_tensorboard

__all__ = [name for name in dir() if not name.startswith("_")]
