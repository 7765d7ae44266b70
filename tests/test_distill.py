"""Embedding distillation: each loss term against values computed by hand, the config checks, and
2-rank ZeRO-3 gradient parity with the global pool (student gathered with gradient, teacher without)."""

import json
import math

import numpy as np
import pytest
import torch

import embedtrain
from conftest import embedtrain_cli, shared_scenarios
from embedtrain.config import ConfigError, load_config
from embedtrain.losses import embedding_distance, score_kl
from embedtrain.model.distill import new_projection
from embedtrain.train.step import distill_loss

TOLERANCE = 1e-5


def softmax(row):
    top = max(row)
    exps = [math.exp(x - top) for x in row]
    return [e / sum(exps) for e in exps]


def test_embedding_terms_by_hand():
    projected = torch.tensor([[1.0, 0.0, 2.0], [0.5, -1.0, 0.0]])
    teacher = torch.tensor([[0.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    cosine, mse = embedding_distance(projected, teacher)
    # row 0: s.t = 2, |s| = sqrt(5), |t| = sqrt(2); row 1: s.t = 0.5, |s| = sqrt(1.25), |t| = 1
    expected_cosine = ((1 - 2 / math.sqrt(10)) + (1 - 0.5 / math.sqrt(1.25))) / 2
    # squared differences: 1, 1, 1 and 0.25, 1, 0 over 6 elements
    expected_mse = (1 + 1 + 1 + 0.25 + 1 + 0) / 6
    assert float(cosine) == pytest.approx(expected_cosine, rel=1e-6)
    assert float(mse) == pytest.approx(expected_mse, rel=1e-6)


def test_score_kl_by_hand_with_a_mask():
    student = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, -1.0]])
    teacher = torch.tensor([[1.0, 1.0, 5.0], [0.5, 2.0, 0.0]])
    masked = torch.tensor([[False, False, True], [False, False, False]])
    kl = score_kl(student, teacher, masked)
    # row 0 over its first two candidates only; row 1 over all three
    expected = 0.0
    for s_row, t_row in (([2.0, 1.0], [1.0, 1.0]), ([0.0, 3.0, -1.0], [0.5, 2.0, 0.0])):
        p, q = softmax(t_row), softmax(s_row)
        expected += sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q))
    assert float(kl) == pytest.approx(expected / 2, rel=1e-6)
    assert float(score_kl(teacher, teacher)) == pytest.approx(0.0, abs=1e-7)
    student.requires_grad_()
    score_kl(student, teacher, masked).backward()
    assert torch.isfinite(student.grad).all() and float(student.grad[0, 2]) == 0.0


def test_distill_loss_combines_the_terms_by_hand():
    """Group pool, 2 queries x (1 + 1) passages, student width 2, teacher width 3: the total is the
    weighted sum of InfoNCE, cosine, MSE and KL, each computed by hand."""
    config = load_config(
        "tiny",
        [
            "loss.negatives=group",
            "loss.hard_negatives=1",
            "loss.temperature=0.5",
            "loss.distill.teacher_cache=unused",
            "loss.distill.contrastive=0.5",
            "loss.distill.cosine=2.0",
            "loss.distill.mse=3.0",
            "loss.distill.kl=4.0",
            "loss.distill.kl_temperature=0.25",
        ],
    )
    unit = torch.nn.functional.normalize
    queries = unit(torch.tensor([[1.0, 0.0], [0.6, 0.8]]), dim=-1)
    passages = unit(torch.tensor([[0.8, 0.6], [0.0, 1.0], [1.0, 0.0], [0.6, 0.8]]), dim=-1)
    projected_q = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]])
    projected_p = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    teacher_q = unit(torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]]), dim=-1)
    teacher_p = unit(torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.0, 1.0, 1.0]]), dim=-1)
    batch = {
        "teacher_query": teacher_q,
        "teacher_passage": teacher_p,
        "positive_hash": torch.tensor([[1], [3]]),
        "passage_hash": torch.tensor([1, 2, 3, 4]),
    }
    total, stats = distill_loss(
        torch.cat([queries, projected_q], -1), torch.cat([passages, projected_p], -1), batch, config.loss, "cpu"
    )

    def dot(a, b):
        return sum(x * y for x, y in zip(a.tolist(), b.tolist()))

    infonce = kl = 0.0
    for i in range(2):
        group = [passages[2 * i], passages[2 * i + 1]]
        logits = [dot(queries[i], p) / 0.5 for p in group]
        infonce += -math.log(softmax(logits)[0]) / 2
        student = softmax([dot(queries[i], p) / 0.25 for p in group])
        teacher = softmax([dot(teacher_q[i], teacher_p[2 * i + g]) / 0.25 for g in range(2)])
        kl += sum(t * (math.log(t) - math.log(s)) for t, s in zip(teacher, student)) / 2
    projected, teacher = torch.cat([projected_q, projected_p]), torch.cat([teacher_q, teacher_p])
    cosine = sum(1 - dot(s, t) / math.sqrt(dot(s, s) * dot(t, t)) for s, t in zip(projected, teacher)) / 6
    mse = sum((a - b) ** 2 for s, t in zip(projected.tolist(), teacher.tolist()) for a, b in zip(s, t)) / 18
    assert float(stats["loss_contrastive"]) == pytest.approx(infonce, rel=1e-6)
    assert float(stats["distill_cosine"]) == pytest.approx(cosine, rel=1e-6)
    assert float(stats["distill_mse"]) == pytest.approx(mse, rel=1e-6)
    assert float(stats["distill_kl"]) == pytest.approx(kl, rel=1e-6)
    assert float(total) == pytest.approx(0.5 * infonce + 2 * cosine + 3 * mse + 4 * kl, rel=1e-6)


def test_projection_is_xavier_with_zero_bias_and_seeded():
    a, b = new_projection(64, 256, seed=3), new_projection(64, 256, seed=3)
    bound = math.sqrt(6 / (64 + 256))
    assert torch.equal(a.weight, b.weight) and a.weight.dtype == torch.float32
    largest = float(a.weight.detach().abs().max())
    assert 0.9 * bound < largest <= bound
    assert float(a.bias.detach().abs().max()) == 0.0


@pytest.mark.parametrize(
    "override, message",
    [
        ("loss.distill.cosine_weight=1", "loss.distill.cosine_weight: unknown key"),
        ("loss.distill.kl=1", "loss.distill.teacher_cache: required"),
        ("loss.distill={teacher_cache: c, cosine: 0, mse: 0}", "nothing to train"),
        ("loss.distill={teacher_cache: c, kl_temperature: 0}", "kl_temperature must be positive"),
        ("loss.distill={teacher_cache: c, mse: -1}", "loss.distill.mse must be >= 0"),
    ],
)
def test_config_errors_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("tiny", [override])


def test_config_fills_the_defaults():
    distill = load_config("tiny", ["loss.distill.teacher_cache=cache"]).loss.distill
    assert distill == {
        "teacher_cache": "cache",
        "contrastive": 0.0,
        "cosine": 1.0,
        "mse": 1.0,
        "kl": 0.0,
        "kl_temperature": 0.05,
    }


TWO_RANK_EXTRAS = [[], ["--matryoshka", "--query-negatives", "--grad-cache", "1"]]


TWO_RANKS = {"detached": ["--negatives", "global", "--distill", "--detached"]}  # first: its patch must not leak
TWO_RANKS.update({" ".join(extra): ["--negatives", "global", "--distill", *extra] for extra in TWO_RANK_EXTRAS})
shared_scenarios(__name__, 2, "grad_parity.py", TWO_RANKS)


@pytest.fixture(scope="module")
def two_ranks(scenario_launch):
    """This file's 2-rank grad_parity.py scenarios (the session's shared launch), keyed by their extra arguments."""
    return scenario_launch(__name__, 2)


@pytest.mark.parametrize("extra", TWO_RANK_EXTRAS)
def test_two_rank_global_pool_matches_plain_pytorch(two_ranks, extra):
    """All four terms (contrastive 0.5, cosine, MSE, KL at tau 0.1) over the global pool on 2 ranks,
    ZeRO-3 with checkpointing, against one plain PyTorch process holding the whole global batch; the
    projection's gradients included. With Matryoshka dims, query negatives and GradCache too."""
    result = two_ranks[" ".join(extra)]
    assert "projection.weight" in result["parameters"] and "projection.bias" in result["parameters"]
    assert all(term["distill_kl"] > 0 and term["distill_cosine"] > 0 for term in result["loss_terms"]), result
    assert abs(result["ds_loss"] - result["ref_loss"]) <= TOLERANCE * abs(result["ref_loss"])
    assert result["max_rel_error"] < TOLERANCE, result


def test_two_rank_parity_catches_a_student_pool_without_gradient(two_ranks):
    """The same run with the student's pool gathered without gradient (the local slice put back):
    the gradients must differ, so the parity test above can fail."""
    result = two_ranks["detached"]
    assert result["max_rel_error"] > 100 * TOLERANCE, result


def test_train_and_export_a_student_with_and_without_its_projection(tiny_export, demo_data, tmp_path):
    """The CLI path: a teacher cache from an exported model, a distillation run (all four terms, the
    local pool), then the export: by default the student at its own width, no projection; with
    --keep-projection, sentence-transformers and embedtrain both give normalize(W s + b) of the
    student's vector s, in the teacher's width."""
    cache, run = tmp_path / "cache", tmp_path / "run"
    result = embedtrain_cli(
        "encode", tiny_export, "--teacher-cache", demo_data, "--subsets", "FEVER", "--output", cache,
        "--cache-dtype", "float32",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    settings = [
        "data.subsets=[FEVER]",
        "loss.negatives=local",
        "train.max_steps=3",
        "logging.every=1",
        f"loss.distill.teacher_cache={cache}",
        "loss.distill.contrastive=1",
        "loss.distill.kl=1",
    ]
    result = embedtrain_cli(
        "train", "--config", "tiny", "--output-dir", run, *[a for s in settings for a in ("--set", s)]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "step 3:" in result.stdout + result.stderr
    for name, extra in (("student", ()), ("teacher-space", ("--keep-projection",))):
        result = embedtrain_cli("export", run, tmp_path / name, *extra)
        assert result.returncode == 0, result.stderr[-3000:]
    assert not (tmp_path / "student" / "3_Dense").exists()
    metadata = json.loads((tmp_path / "student" / "embedtrain.json").read_text())
    assert "projection" not in metadata
    assert metadata["embedtrain_version"] == embedtrain.__version__  # the export records its writer

    from safetensors.torch import load_file
    from sentence_transformers import SentenceTransformer

    from embedtrain import BiEncoder

    texts = ["Who wrote the novel about the white whale?", "A short passage about rivers and the sea."]
    student = BiEncoder.from_pretrained(tmp_path / "student", device="cpu", dtype="float32")
    kept = BiEncoder.from_pretrained(tmp_path / "teacher-space", device="cpu", dtype="float32")
    teacher_width = json.loads((cache / "teacher.json").read_text())["teacher_dim"]
    assert student.width == student.module.backbone.config.hidden_size and kept.width == teacher_width
    dense = load_file(str(tmp_path / "teacher-space" / "3_Dense" / "model.safetensors"))
    s = torch.from_numpy(student.encode(texts, prompt="query"))
    expected = torch.nn.functional.normalize(s @ dense["linear.weight"].T + dense["linear.bias"], dim=-1).numpy()
    ours = kept.encode(texts, prompt="query")
    theirs = SentenceTransformer(str(tmp_path / "teacher-space"), device="cpu", trust_remote_code=True).encode(
        texts, prompt_name="query"
    )
    for got in (ours, theirs):
        assert got.shape == (2, teacher_width)
        assert float((got * expected).sum(-1).min()) > 0.99999
    assert not np.allclose(dense["linear.bias"].numpy(), 0)  # trained, not the zero initialisation
