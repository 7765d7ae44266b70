"""ModelKind: what differs between the kinds of model embedtrain trains (model.kind), in one object.

The training loop, the engine builder, checkpoints, resume checks and export ask the kind object
(embedtrain.kinds.kind_of(config)) instead of testing `model.kind`; each kind's module implements
this interface by calling the existing pieces where they live (collators in data/collate.py, modules
in model/, backward passes in train/step.py, in-training evaluation in train/evaluation.py). A new
kind is one module with a ModelKind subclass plus one line in embedtrain/kinds/__init__.py's KINDS
(docs/design.md, Adding a model kind).

Two things stay outside the object, because their modules sit in other layers (tests/test_layers.py):
config.py checks each kind's settings when a config loads (the config layer is below the kinds), and
export.py holds the writers of the export formats (the commands layer is above them): a kind names
its format in `export_format`, and export.py's EXPORT_FORMATS maps it to the writer.
"""


class ModelKind:
    """One kind of model: how it is collated, built, trained, evaluated, recorded and exported.
    Subclasses set the attributes and override the methods that raise NotImplementedError."""

    name = ""  # the model.kind value
    # the file in <run>/base_model whose presence records this kind for the export (None: the
    # default kind, recorded by no file); base_model_files writes it
    base_model_file = None
    export_format = ""  # the key of the writer in embedtrain.export.EXPORT_FORMATS
    # the settings that cut a training example into token sequences: a resume that changes one
    # changes the data order (train/resume_checks.py)
    length_keys = ()
    # the settings (beyond model.kind and model.lora) that decide which parameters exist: a resume
    # may not change them (train/resume_checks.py)
    model_keys = ()
    eval_note = ""  # after the in-training eval line: what the metrics are of, when not a corpus search

    def check_family(self, family, config):
        """Raise ConfigError when the backbone family (model/families.py) cannot be trained as this
        kind; called right after the backbone loads, before any adapter or checkpointing."""

    def build_module(self, config, backbone, dtype, teacher_dim=None):
        """The nn.Module to train around the loaded `backbone` (its forward takes an EncoderInputs):
        the engine wraps it. `teacher_dim`: the teacher cache's width under loss.distill."""
        raise NotImplementedError

    def make_collator(self, tokenizer, config, dataset_info, one_row, teacher=None):
        """The collator of training batches (data/collate.py): examples -> one micro-batch dict.
        `dataset_info`: the prepared manifest's subsets; `one_row`: the attention kernel packs a
        micro-batch in one row; `teacher`: the TeacherCache under loss.distill."""
        raise NotImplementedError

    def backward(self, engine, batch, config, divisor, group=None, boundary=None):
        """engine.backward for one micro-batch; returns (loss, stats). `divisor`: the rank's queries
        in the optimizer step over this micro-batch's; `group`: the negatives group of the global
        pool; `boundary`: see train/grad_cache.set_boundary. The loop calls engine.step() after."""
        raise NotImplementedError

    @staticmethod
    def grad_cache(config, batch):
        """Whether `backward` runs this micro-batch through GradCache: train.grad_cache_chunk_size is
        set, or train.micro_batch_tokens cut it into chunks (the collator's "chunks")."""
        return bool(config.train.grad_cache_chunk_size) or "chunks" in batch

    def budget_chunks(self, config):
        """Whether train.micro_batch_tokens cuts GradCache chunks (a query's loss needs the whole
        micro-batch, which must then stay train.micro_batch_size queries) rather than micro-steps."""
        return False

    def eval_sources(self, config, collator):
        """The held-out data of eval.path as this kind's `evaluate` reads it (eval.path is set)."""
        raise NotImplementedError

    def evaluate(self, engine, tokenizer, sources, config):
        """In-training evaluation on every rank: {subset: metrics, "mean": metrics} on rank 0, None
        elsewhere (metrics as embedtrain.retrieval.metrics gives them)."""
        raise NotImplementedError

    def learning_rates(self, config):
        """{parameter name prefix: peak learning rate} of the parameters this kind trains at a rate of
        their own (the others train at train.lr); optim.schedule scales every rate alike."""
        return {}

    def base_model_files(self, config):
        """{file name: JSON object} this kind adds to <run>/base_model (copied into every checkpoint):
        what its export needs beyond the backbone config, tokenizer and prompts."""
        return {}
