"""Long documents: a 4,096-token text gets the same embedding alone, in a left- or right-padded
batch and in a padding-free (packed) batch (fp32, 1e-5); packed position ids restart per sequence;
RoPE scaling from the checkpoint's config is honoured and survives export."""

import pytest
import torch

from embedtrain.model import Encoder, load_backbone
from embedtrain.model.bidirectional import positions_from_mask
from embedtrain.model.packing import pack

TOLERANCE = 1e-5
LONG = 4096


def random_ids(length, seed):
    return torch.randint(0, 1000, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def padded(sequences, side):
    width = max(map(len, sequences))
    ids = torch.zeros(len(sequences), width, dtype=torch.long)
    mask = torch.zeros(len(sequences), width, dtype=torch.long)
    for row, sequence in enumerate(sequences):
        span = slice(0, len(sequence)) if side == "right" else slice(width - len(sequence), width)
        ids[row, span], mask[row, span] = torch.tensor(sequence), 1
    return ids, mask


@pytest.fixture(scope="module")
def encoder(tiny_llama):
    return Encoder(load_backbone(tiny_llama, dtype=torch.float32), pooling="avg").eval()


@pytest.mark.parametrize("pooling", ["avg", "last"])
def test_a_4096_token_text_embeds_the_same_alone_padded_and_packed(encoder, pooling):
    encoder.pooling = pooling
    long_text, longer, short = random_ids(LONG, 0), random_ids(LONG + 300, 1), random_ids(37, 2)
    with torch.no_grad():
        alone = encoder(torch.tensor([long_text]), torch.ones(1, LONG, dtype=torch.long))[0]
        results = {}
        for side in ("left", "right"):
            ids, mask = padded([short, long_text, longer], side)  # the long text is padded by 300
            results[side] = encoder(ids, mask)[1]
        packed = encoder(pack([short, long_text, random_ids(500, 3)], pad_to_multiple_of=64))
        assert packed.shape[0] == 3
        results["packed"] = packed[1]
    for name, embedding in results.items():
        error = float((embedding - alone).abs().max())
        assert error < TOLERANCE, (name, error)
    encoder.pooling = "avg"


def test_packed_rows_do_not_see_each_other(encoder):
    """Changing one packed sequence leaves the embeddings of the others unchanged."""
    first, second = random_ids(50, 4), random_ids(70, 5)
    with torch.no_grad():
        base = encoder(pack([first, second]))
        changed = encoder(pack([first, second[:-1] + [7]]))
    torch.testing.assert_close(changed[0], base[0], rtol=0, atol=1e-6)
    assert float((changed[1] - base[1]).abs().max()) > 1e-4


def test_packed_positions_restart_and_segments_cover_every_token():
    packed = pack([[5, 6, 7], [8, 9], [10]], pad_to_multiple_of=8)
    assert packed.attention_mask.tolist() == [[1, 1, 1, 2, 2, 3, 0, 0]]
    positions = [[0, 1, 2, 0, 1, 0, 0, 0]]
    assert packed.position_ids.tolist() == positions_from_mask(packed.attention_mask).tolist() == positions
    assert packed.cu_seq_lens.tolist() == [0, 3, 5, 6, 8] and packed.max_length == 3  # the padding: a segment
    assert packed.token_sequence.tolist() == [0, 0, 0, 1, 1, 2, 3, 3]
    # left and right padding agree on the positions of real tokens
    left = positions_from_mask(torch.tensor([[0, 0, 1, 1, 1]]))
    right = positions_from_mask(torch.tensor([[1, 1, 1, 0, 0]]))
    assert left[0, 2:].tolist() == right[0, :3].tolist() == [0, 1, 2]


LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 512,
    "rope_theta": 500000.0,
}


@pytest.fixture(scope="module")
def rope_scaled_llama(tiny_llama, tmp_path_factory):
    """The tiny Llama with Llama 3.x RoPE scaling in its config.json (same weights)."""
    import json
    import shutil

    folder = tmp_path_factory.mktemp("rope") / "tiny-llama3-rope"
    shutil.copytree(tiny_llama, folder)
    config = json.loads((folder / "config.json").read_text())
    config["rope_parameters"] = LLAMA3_ROPE
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_rope_scaling_is_honoured_and_survives_export(tiny_llama, rope_scaled_llama, tmp_path):
    from test_cli import embedtrain
    from transformers import AutoModel

    scaled = Encoder(load_backbone(rope_scaled_llama, dtype=torch.float32)).eval()
    plain = Encoder(load_backbone(tiny_llama, dtype=torch.float32)).eval()
    assert scaled.backbone.rotary_emb.rope_type == "llama3"
    ids = torch.tensor([random_ids(LONG, 6)])
    with torch.no_grad():
        difference = (scaled(ids, torch.ones_like(ids)) - plain(ids, torch.ones_like(ids))).abs().max()
    assert difference > 1e-4  # the scaled frequencies change attention (numerical noise is ~1e-7)

    run = embedtrain(
        "train",
        "--config",
        "tiny",
        "--output-dir",
        tmp_path / "run",
        "--set",
        f"model.path={rope_scaled_llama}",
        "--set",
        "train.max_steps=1",
        "--set",
        "data.passage_max_length=1024",
        "--set",
        "logging.every=1",
    )
    assert run.returncode == 0, run.stderr[-3000:]
    exported = embedtrain("export", tmp_path / "run", tmp_path / "out")
    assert exported.returncode == 0, exported.stderr[-3000:]
    model = AutoModel.from_pretrained(tmp_path / "out", trust_remote_code=True, dtype=torch.float32)
    assert model.rotary_emb.rope_type == "llama3"
    torch.testing.assert_close(model.rotary_emb.inv_freq, scaled.backbone.rotary_emb.inv_freq)
    assert not torch.allclose(model.rotary_emb.inv_freq, plain.backbone.rotary_emb.inv_freq)


def test_training_on_2048_token_passages_matches_plain_pytorch(tmp_path):
    """2 ranks, ZeRO-3, activation checkpointing, global pool, passages of 2,048 tokens (up to
    255 of them padding): loss and every gradient equal one plain PyTorch step on the whole batch."""
    from conftest import run_worker

    result, _ = run_worker("grad_parity.py", tmp_path / "r.json", "--negatives", "global", "--long", "2048", nproc=2)
    assert abs(result["ds_loss"] - result["ref_loss"]) <= TOLERANCE * abs(result["ref_loss"]), result
    assert result["max_rel_error"] < TOLERANCE, result


def test_token_budget_batches_longest_first_within_the_budget():
    from embedtrain.inference.batching import token_budget_batches

    lengths = [10, 500, 20, 400, 30, 2000]
    batches = token_budget_batches(lengths, batch_size=8, max_tokens=1000)
    assert batches == [[5], [1, 3], [4, 2, 0]]  # 2000 alone (over budget), then 2 x 500, then 3 x 30
    assert token_budget_batches(lengths, batch_size=2) == [[5, 1], [3, 4], [2, 0]]


@pytest.fixture(scope="module")
def tokenizer(tiny_llama):
    from embedtrain.model.encoder import load_tokenizer

    return load_tokenizer(tiny_llama)


def words(count, seed):
    generator = torch.Generator().manual_seed(seed)
    vocabulary = ["river", "copper", "north", "chemist", "born", "museum", "eleven", "glass", "map", "song"]
    return " ".join(vocabulary[i] for i in torch.randint(0, len(vocabulary), (count,), generator=generator))


def test_token_budget_encoding_equals_one_text_at_a_time(encoder, tokenizer):
    from embedtrain.inference.batching import encode_texts

    texts = [words(n, n) for n in (5, 3000, 40, 900, 12)]
    assert max(len(tokenizer(t)["input_ids"]) for t in texts) > 2048
    budgeted = encode_texts(encoder, tokenizer, texts, batch_size=16, max_length=LONG, max_tokens=4096)
    single = encode_texts(encoder, tokenizer, texts, batch_size=1, max_length=LONG)
    np_error = abs(budgeted - single).max()
    assert np_error < TOLERANCE, np_error


def test_long_documents_chunk_mean_of_window_embeddings(encoder, tokenizer):
    """--long-documents chunk: windows of max_length tokens, each with BOS and the prompt's tokens,
    consecutive windows sharing `overlap` tokens; the embedding is the re-normalised mean."""
    from embedtrain.inference.batching import encode_texts

    text, prompt, max_length, overlap = words(300, 7), "passage: ", 64, 8
    got = encode_texts(
        encoder,
        tokenizer,
        [text, "short one"],
        max_length=max_length,
        long_documents="chunk",
        chunk_overlap=overlap,
        prompt=prompt,
    )
    content = tokenizer(prompt + text, add_special_tokens=False)["input_ids"]
    head = tokenizer("passage:", add_special_tokens=False)["input_ids"]
    assert content[: len(head)] == head
    body, window = content[len(head) :], max_length - 1 - len(head)
    windows = [
        [tokenizer.bos_token_id] + head + body[i : i + window] for i in range(0, len(body) - overlap, window - overlap)
    ]
    assert len(windows) > 3 and all(len(w) <= max_length for w in windows)
    with torch.no_grad():
        vectors = torch.cat([encoder(torch.tensor([w]), torch.ones(1, len(w), dtype=torch.long)) for w in windows])
    expected = torch.nn.functional.normalize(vectors.mean(0), dim=-1)
    assert float((torch.from_numpy(got[0]) - expected).abs().max()) < TOLERANCE
    truncated = encode_texts(encoder, tokenizer, [text, "short one"], max_length=max_length, prompt=prompt)
    assert abs(got[1] - truncated[1]).max() < 1e-6  # texts within max_length are not chunked
    assert abs(got[0] - truncated[0]).max() > 1e-3
