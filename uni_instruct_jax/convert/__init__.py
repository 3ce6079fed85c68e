"""Torch-free, code-execution-free import of PyTorch EDM checkpoints and torch.save files."""

from uni_instruct_jax.convert.edm_to_flax import convert_edm_pickle
from uni_instruct_jax.convert.edm_to_flax import load_edm_pickle
from uni_instruct_jax.convert.edm_to_flax import StateDictMismatchError
from uni_instruct_jax.convert.edm_to_flax import TeacherMetadata
from uni_instruct_jax.convert.safe_unpickle import CheckpointFormatError
from uni_instruct_jax.convert.safe_unpickle import load_npz
from uni_instruct_jax.convert.safe_unpickle import load_pickle
from uni_instruct_jax.convert.safe_unpickle import load_torch_file
from uni_instruct_jax.convert.safe_unpickle import load_torch_state_dict
from uni_instruct_jax.convert.safe_unpickle import UnsafePickleError
