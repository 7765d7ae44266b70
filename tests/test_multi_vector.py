"""Multi-vector (ColBERT) models without training: MaxSim and its InfoNCE against hand references,
the `global` pool's gradients on 2 ranks against 1 (the session's shared launch), the encoder's
packed and padded layouts, the export loaded by sentence-transformers' MultiVectorEncoder itself
(equal token embeddings and scores, left and right padding), and exact search against brute force."""

import math
import string

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import shared_scenarios
from embedtrain.config import LossConfig
from embedtrain.encode import encode_command
from embedtrain.errors import EncodeError
from embedtrain.export_multi_vector import export_multi_vector, policy_from_prompts
from embedtrain.inference import BiEncoder, MultiVectorEncoder
from embedtrain.inference.loading import model_kind
from embedtrain.inference.multi_vector import encode_tokens, maxsim_matrix
from embedtrain.inference.token_index import (
    flatten,
    maxsim_search,
    read_token_embeddings,
    unflatten,
    write_token_embeddings,
)
from embedtrain.losses import group_maxsim_scores, maxsim_scores, positive_targets
from embedtrain.model.encoder import load_backbone, load_tokenizer
from embedtrain.model.multi_vector import MultiVectorEncoder as MultiVectorModule
from embedtrain.model.multi_vector import (
    MultiVectorSettings,
    document_mask,
    expanded_query_batch,
    skiplist_ids,
)
from embedtrain.model.packing import pack_rows, padded_inputs
from embedtrain.prompts import PromptPolicy
from embedtrain.train.multi_vector_loss import maxsim_negatives_loss

RELATIVE = 1e-4  # export parity with sentence-transformers
PARITY = 1e-5  # gradient parity, fp32


def random_tokens(count, length, dims=8, seed=0, empty_row=None):
    generator = torch.Generator().manual_seed(seed)
    embeddings = F.normalize(torch.randn(count, length, dims, generator=generator), dim=-1)
    mask = torch.rand(count, length, generator=generator) > 0.4
    mask[:, 0] = True
    if empty_row is not None:
        mask[empty_row] = False
    return embeddings, mask


def reference_maxsim(q, q_mask, d, d_mask):
    """MaxSim in plain Python loops: sum over scored query tokens of the best scored document token."""
    out = torch.zeros(q.shape[0], d.shape[0], dtype=torch.float64)
    for i in range(q.shape[0]):
        for j in range(d.shape[0]):
            total = 0.0
            for t in range(q.shape[1]):
                if not q_mask[i, t]:
                    continue
                sims = [float(q[i, t] @ d[j, s]) for s in range(d.shape[1]) if d_mask[j, s]]
                total += max(sims) if sims else 0.0
            out[i, j] = total
    return out


def test_maxsim_scores_match_a_hand_reference_in_any_block_size():
    q, q_mask = random_tokens(3, 4, seed=1)
    d, d_mask = random_tokens(5, 6, seed=2, empty_row=3)  # document 3 has no scored token: scores 0
    expected = reference_maxsim(q, q_mask, d, d_mask)
    for max_elements in (1, 30, 2**26):  # one document per block, a few, all at once
        got = maxsim_scores(q, q_mask, d, d_mask, max_elements=max_elements)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=1e-6)
    assert float(expected[:, 3].abs().max()) == 0.0
    # each query's own group (2 passages per query after the first 3 x 2 rows) is the full matrix's block
    d6, d6_mask = random_tokens(6, 5, seed=3)
    full = maxsim_scores(q, q_mask, d6, d6_mask)
    group = group_maxsim_scores(q, q_mask, d6, d6_mask)
    torch.testing.assert_close(group, torch.stack([full[i, 2 * i : 2 * i + 2] for i in range(3)]))


def reference_info_nce(scores, candidates, temperature):
    """Mean over queries of -log softmax of the first candidate, from a (Q, P) score table."""
    total = 0.0
    for i, cands in enumerate(candidates):
        logits = [float(scores[i, j]) / temperature for j in cands]
        total += -(logits[0] - math.log(sum(math.exp(x) for x in logits)))
    return total / len(candidates)


def test_maxsim_info_nce_matches_a_hand_reference_for_group_and_local_pools():
    tau = 0.5
    q, q_mask = random_tokens(2, 4, seed=4)
    d, d_mask = random_tokens(6, 5, seed=5)  # 3 passages per query: positive, 2 hard negatives
    passage_hash = torch.arange(6)
    passage_hash[5] = 0  # query 1's second hard negative is query 0's positive: not a negative of query 0
    positive_hash = passage_hash[::3].clone()
    table = reference_maxsim(q, q_mask, d, d_mask)
    config = LossConfig(negatives="group", temperature=tau)
    loss, stats = maxsim_negatives_loss(q, q_mask, d, d_mask, positive_hash, passage_hash, config)
    assert math.isclose(loss.item(), reference_info_nce(table, [[0, 1, 2], [3, 4, 5]], tau), rel_tol=1e-5)
    config.negatives = "local"
    loss, stats = maxsim_negatives_loss(q, q_mask, d, d_mask, positive_hash, passage_hash, config)
    # query 0: every passage but 5 (a copy of its positive); query 1: every passage, its positive first
    expected = reference_info_nce(table, [[0, 1, 2, 3, 4], [3, 0, 1, 2, 4, 5]], tau)
    assert math.isclose(loss.item(), expected, rel_tol=1e-5)
    assert float(stats["masked_fraction"]) == pytest.approx(1 / 12)
    assert positive_targets(2, 3).tolist() == [0, 3]


shared_scenarios(__name__, 2, "maxsim_parity.py", {"global uneven": ["--sizes", "3,1"]})


def test_maxsim_global_pool_gradients_on_two_ranks_equal_one_rank(scenario_launch):
    """2 ranks (uneven queries, passages of different token counts, padded by the gather) with the
    `global` pool against one process's `local` pool over the whole set; a detached gather fails."""
    result = scenario_launch(__name__, 2)["global uneven"]
    assert result["world"] == 2
    assert result["loss"] == pytest.approx(result["ref_loss"], rel=PARITY), result
    assert result["query_grad_error"] < PARITY and result["passage_grad_error"] < PARITY, result
    assert result["detached_passage_grad_error"] > 1e-2, result  # the check can fail
    assert result["masked_fraction"] > 0


@pytest.fixture(scope="module")
def tiny_module(tiny_llama):
    """The tiny Llama as a multi-vector encoder with a seeded random projection (no training)."""
    backbone = load_backbone(tiny_llama)
    torch.manual_seed(0)
    module = MultiVectorModule(backbone, dim=16).eval()
    return module, load_tokenizer(tiny_llama)


def test_packed_batches_give_the_padded_token_embeddings_on_either_side(tiny_module):
    module, tokenizer = tiny_module
    texts = ["Shilin Linlofo is a chemist.", "Paris, in France!", "a b c d e f g h i j"]
    sequences = tokenizer(texts)["input_ids"]
    with torch.no_grad():
        packed = module(pack_rows(sequences, capacity=16))
        for side in ("right", "left"):
            tokenizer.padding_side = side
            batch = tokenizer.pad({"input_ids": sequences}, return_tensors="pt")
            padded = module(batch["input_ids"], batch["attention_mask"])
            for row, sequence in enumerate(sequences):
                got = packed.embeddings[row][packed.mask[row]]
                want = padded.embeddings[row][padded.mask[row]]
                assert packed.input_ids[row][packed.mask[row]].tolist() == sequence
                torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    # gradients through the re-padding (index_put) equal the padded batch's
    weights = torch.randn(sum(len(s) for s in sequences), module.width, generator=torch.Generator().manual_seed(0))
    grads = []
    padded = tokenizer.pad({"input_ids": sequences}, return_tensors="pt")
    for inputs in (pack_rows(sequences, capacity=16), padded_inputs(padded["input_ids"], padded["attention_mask"])):
        module.zero_grad()
        tokens = module(inputs)
        (tokens.embeddings[tokens.mask] * weights).sum().backward()
        grads.append([p.grad.clone() for p in (module.head.linear.weight, module.backbone.embed_tokens.weight)])
    module.zero_grad()
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    tokenizer.padding_side = "right"


def test_query_expansion_layout_and_the_document_skiplist(tiny_module):
    _, tokenizer = tiny_module
    ids, attended, scored = expanded_query_batch([[5, 6, 7], [1, 2, 3, 4, 5, 6]], 5, 99, attend=False)
    assert ids.tolist() == [[5, 6, 7, 99, 99], [1, 2, 3, 4, 5]]
    assert attended.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]] and bool(scored.all())
    ids, attended, _ = expanded_query_batch([[5, 6, 7]], 5, 99, attend=True, padding_side="left")
    assert ids.tolist() == [[99, 99, 5, 6, 7]] and attended.tolist() == [[1, 1, 1, 1, 1]]
    skip = skiplist_ids(tokenizer, string.punctuation)
    assert skip == sorted({tokenizer.convert_tokens_to_ids(w) for w in string.punctuation} - {None})
    ids = torch.tensor([tokenizer("Paris, in France!")["input_ids"]])
    kept = document_mask(ids, torch.ones_like(ids, dtype=torch.bool), skip)
    assert tokenizer.decode(ids[kept]) == tokenizer.decode(ids[0]).replace(",", "").replace("!", "")


QUERIES = ["Who is Shilin Linlofo?", "capital of France", "a much longer query with many words in it, truly"]
DOCUMENTS = ["Shilin Linlofo is a chemist.", "Paris is the capital of France!", "Berlin; Germany's capital.", "x"]


@pytest.mark.parametrize("side, attend", [("left", False), ("right", True)])
def test_export_loads_in_sentence_transformers_with_equal_tokens_and_scores(
    tiny_module, tiny_llama, tmp_path, side, attend
):
    """sentence-transformers' MultiVectorEncoder loads the export itself; its encode_query /
    encode_document token embeddings and its MaxSim scores equal embedtrain's, loaded from the same
    folder and from the module in memory (relative 1e-4): query expansion, the punctuation skiplist,
    prompts and truncation included."""
    from sentence_transformers import MultiVectorEncoder as STMultiVectorEncoder

    module, _ = tiny_module
    settings = MultiVectorSettings(
        dim=16,
        document_length=12,
        query_expansion={"length": 20, "attend": attend},  # the queries: 16, 13 and 26 tokens
        skiplist_words=list(string.punctuation),
    )
    policy = policy_from_prompts("query: ", "passage: ")
    out = export_multi_vector(module.state_dict(), tiny_llama, tmp_path / "mv", settings, policy, padding_side=side)
    assert model_kind(out) == "multi_vector"
    with pytest.raises(EncodeError, match="multi-vector"):
        BiEncoder.from_pretrained(out, device="cpu")

    ours = MultiVectorEncoder.from_pretrained(out, device="cpu")
    assert ours.tokenizer.padding_side == side and ours.settings == settings
    theirs = STMultiVectorEncoder(str(out), device="cpu", trust_remote_code=True)
    st_queries = [t.float().numpy() for t in theirs.encode_query(QUERIES)]
    st_documents = [t.float().numpy() for t in theirs.encode_document(DOCUMENTS)]
    in_memory = MultiVectorEncoder(module, load_tokenizer(tiny_llama, side), policy, settings, 1023)
    for model in (ours, in_memory):
        queries, documents = model.encode_query(QUERIES), model.encode_document(DOCUMENTS)
        for got, want in zip(queries + documents, st_queries + st_documents):
            assert got.shape == want.shape
            np.testing.assert_allclose(got, want, rtol=RELATIVE, atol=1e-5)
    assert all(q.shape[0] == 20 for q in st_queries)  # expanded (and cut) to exactly 20 tokens
    kept = [i for i in ours.tokenizer("passage: " + DOCUMENTS[2], truncation=True, max_length=12)["input_ids"]]
    skip = skiplist_ids(ours.tokenizer, string.punctuation)
    assert st_documents[2].shape[0] == len([i for i in kept if i not in skip]) < len(kept)  # punctuation tokens dropped
    scores = ours.score(QUERIES, DOCUMENTS)
    st_scores = theirs.similarity(theirs.encode_query(QUERIES), theirs.encode_document(DOCUMENTS)).float().numpy()
    np.testing.assert_allclose(scores, st_scores, rtol=RELATIVE)
    np.testing.assert_allclose(maxsim_matrix(st_queries, st_documents), st_scores, rtol=RELATIVE)


def test_token_embedding_files_and_exact_search_in_blocks_equal_brute_force(tmp_path):
    generator = np.random.default_rng(0)
    documents = [generator.standard_normal((n, 8)).astype(np.float32) for n in (3, 1, 7, 2, 5, 4, 6)]
    queries = [generator.standard_normal((n, 8)).astype(np.float32) for n in (2, 4, 3)]
    write_token_embeddings(tmp_path / "corpus.npz", documents)
    embeddings, offsets = read_token_embeddings(tmp_path / "corpus.npz")
    assert embeddings.dtype == np.float32 and offsets.dtype == np.int64
    assert offsets.tolist() == [0, 3, 4, 11, 13, 18, 22, 28]
    assert all(np.array_equal(a, b) for a, b in zip(unflatten(embeddings, offsets), documents))
    brute = maxsim_matrix(queries, documents)
    order = np.argsort(-brute, axis=1, kind="stable")
    for max_elements, query_chunk in ((1, 1), (40, 2), (2**26, 64)):  # a document per block ... all at once
        scores, rows = maxsim_search(
            queries, embeddings, offsets, k=4, query_chunk=query_chunk, max_elements=max_elements
        )
        assert rows.tolist() == order[:, :4].tolist()
        np.testing.assert_allclose(scores, np.take_along_axis(brute, order[:, :4], 1), rtol=1e-6)
    scores, rows = maxsim_search(queries, *flatten(documents), k=50)
    assert rows.shape == (3, 7)  # k cut to the corpus


def test_prompt_policy_of_the_export_is_kept_and_encode_writes_npz(tiny_module, tiny_llama, tmp_path, capsys):
    module, _ = tiny_module
    policy = PromptPolicy("query:", "passage:", "query: ", "passage: ")
    out = export_multi_vector(module.state_dict(), tiny_llama, tmp_path / "mv", prompt_policy=policy)
    loaded = MultiVectorEncoder.from_pretrained(out, device="cpu")
    assert loaded.prompt_policy == policy and loaded.settings == MultiVectorSettings(dim=16)
    one = loaded.encode("query text", prompt="query")
    assert one.shape == (len(loaded.tokenizer("query: query text")["input_ids"]), 16)
    np.testing.assert_allclose(np.linalg.norm(one, axis=1), 1.0, rtol=1e-5)
    torch.testing.assert_close(
        torch.from_numpy(one), torch.from_numpy(encode_tokens(loaded, ["query text"], "query: ", True)[0])
    )
    (tmp_path / "docs.txt").write_text("\n".join(DOCUMENTS) + "\n")
    encode_command(out, tmp_path / "docs.txt", tmp_path / "docs.npz", "document", device="cpu")
    assert f"of {len(DOCUMENTS)} texts to" in capsys.readouterr().out
    embeddings, offsets = read_token_embeddings(tmp_path / "docs.npz")
    for got, want in zip(unflatten(embeddings, offsets), loaded.encode_document(DOCUMENTS)):
        np.testing.assert_array_equal(got, want)
    with pytest.raises(EncodeError, match="multi-vector model writes token embeddings to a .npz"):
        encode_command(out, tmp_path / "docs.txt", tmp_path / "docs.npy", device="cpu")
