"""The student of embedding distillation: an Encoder with a trainable linear projection from its
width to the teacher's, used only by the distillation loss (embedtrain.train.step.distill_loss).

In training mode forward returns [embeddings | projected] concatenated on the last dim, (S, D + T):
one tensor, so the training step's one forward, the global pool's gather and GradCache's embedding
cache treat it as they treat plain embeddings. In eval mode (in-training evaluation) it returns
the student's embeddings alone, as an Encoder does. The projection is computed in fp32, as the
embeddings are; under bf16 DeepSpeed stores it in bf16 with fp32 master weights. It is not part of
the exported model unless `embedtrain export --keep-projection` asks for it; such an export loads
as a TeacherSpaceEncoder.
"""

import torch
import torch.nn.functional as F
from torch import nn

from embedtrain.model.encoder import Encoder

PROJECTION_PREFIX = "projection."  # its parameters' names in checkpoints
PROJECTION_FOLDER = "3_Dense"  # a kept projection in an export: a sentence-transformers Dense module


class ProjectedEncoder(Encoder):
    def __init__(self, backbone, pooling="avg", normalize=True, projection=None):
        super().__init__(backbone, pooling, normalize)
        self.projection = projection

    def forward(self, input_ids, attention_mask=None):
        embeddings_SD = super().forward(input_ids, attention_mask)
        if not self.training:
            return embeddings_SD
        return torch.cat([embeddings_SD, project(self.projection, embeddings_SD)], dim=-1)


class TeacherSpaceEncoder(Encoder):
    """An export whose distillation projection was kept: normalize(projection(student embedding)),
    the vectors sentence-transformers' Dense + Normalize modules of that export give. `normalize`
    applies to the output; the student's embedding is always normalised, as in training."""

    def __init__(self, backbone, pooling="avg", normalize=True, projection=None):
        super().__init__(backbone, pooling, normalize)
        self.output_projection = projection

    @property
    def width(self):
        return self.output_projection.out_features

    def forward(self, input_ids, attention_mask=None):
        student_SD = F.normalize(self.pooled(input_ids, attention_mask), dim=-1)
        projected_ST = project(self.output_projection, student_SD)
        return F.normalize(projected_ST, dim=-1) if self.normalize else projected_ST


def project(projection, embeddings_SD):
    """The projection in fp32 whatever its storage dtype."""
    bias = None if projection.bias is None else projection.bias.float()
    return F.linear(embeddings_SD.float(), projection.weight.float(), bias)


def new_projection(student_dim, teacher_dim, seed):
    """Linear student_dim -> teacher_dim, Xavier-uniform weight and zero bias (the initialisation of
    NeMo AutoModel's distillation projection), fp32, from a generator seeded with `seed` so that
    every rank starts from the same projection."""
    projection = nn.Linear(student_dim, teacher_dim, bias=True, dtype=torch.float32)
    with torch.no_grad():
        bound = (6.0 / (student_dim + teacher_dim)) ** 0.5
        generator = torch.Generator().manual_seed(seed)
        projection.weight.copy_(torch.rand((teacher_dim, student_dim), generator=generator) * 2 * bound - bound)
        projection.bias.zero_()
    return projection


def split_projected(embeddings, student_dim):
    """(student embeddings, projected) of a training forward's [embeddings | projected] output."""
    return embeddings[..., :student_dim], embeddings[..., student_dim:]
