"""The errors embedtrain reports to its user: bad input or a run that cannot go on, each with a
message that names the file, key or option. The command line (embedtrain.cli) prints them without a
traceback; anything else that escapes is a bug. They live here, below every other module, so that
any layer can raise them without importing the layer that owns the input."""


class EmbedtrainError(Exception):
    """Every user-facing embedtrain error."""


class ConfigError(EmbedtrainError, ValueError):
    """A bad recipe, override or DeepSpeed JSON; the message names the key or file."""


class DataError(EmbedtrainError, ValueError):
    """Bad dataset input; the message names the subset, file, column or row."""


class ModelError(EmbedtrainError, ValueError):
    """A model folder that is not a usable checkpoint of a supported family; the message names the path."""


class EncodeError(EmbedtrainError, ValueError):
    """Bad encode input; the message names the file and line (or the option)."""


class CheckpointError(EmbedtrainError, ValueError):
    """A partial, corrupt or foreign checkpoint; the message names the file."""


class MergeError(EmbedtrainError, ValueError):
    """Incompatible inputs; the message names the model and the key."""


class TrainingError(EmbedtrainError, RuntimeError):
    """Training cannot go on (e.g. too many non-finite steps); a checkpoint was written first."""


class UsageError(EmbedtrainError, ValueError):
    """Command-line options that do not fit together or the files they name (e.g. an --output that
    is a folder), found by a command module; the command line reports it as a usage error, with the
    command's usage line (exit code 2)."""
