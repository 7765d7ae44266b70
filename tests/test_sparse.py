"""Sparse (SPLADE) models without training: term weights against a hand computation from the
backbone's states through the checkpoint's LM head, packed against padded batches, bidirectional
attention, the inference-free query table, the LM head loaded or tied; the export loaded by
sentence-transformers' SparseEncoder itself (equal term weights, left and right padding, tied and
untied heads), embedtrain.SparseEncoder and `embedtrain encode` (CSR .npz), and the inverted index
against the densified product. Inference-free queries: the training collator's query vectors, the
Router export as sentence-transformers loads it, embedtrain.SparseEncoder and `embedtrain eval` on
it give the same weights."""

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from embedtrain.config import load_config
from embedtrain.data.nemotron import Example
from embedtrain.encode import encode_command
from embedtrain.eval import evaluate, subset_sources
from embedtrain.export_multi_vector import policy_from_prompts
from embedtrain.export_sparse import export_sparse
from embedtrain.inference import SparseEncoder
from embedtrain.inference.loading import model_kind
from embedtrain.inference.sparse import sparse_layout
from embedtrain.inference.sparse_index import (
    build_index,
    dot_scores,
    from_dense,
    mean_nonzeros,
    read_sparse_vectors,
    search,
)
from embedtrain.kinds.sparse import SparseKind
from embedtrain.model.encoder import load_backbone, load_tokenizer
from embedtrain.model.packing import pack_rows, padded_inputs
from embedtrain.model.sparse import (
    SparseModel,
    SparseSettings,
    StaticTermWeights,
    load_lm_head,
    splade_weights,
    splade_weights_packed,
)
from embedtrain.retrieval import metrics

SEQUENCES = [[5, 9, 13, 200, 7], [44, 3], [1022, 17, 900, 401, 88, 2, 60], [300]]
TEXTS = ["Shilin Linlofo is a chemist.", "Paris", "a longer document about the rivers and hills of a country"]
RELATIVE = 1e-4  # export parity with sentence-transformers


@pytest.fixture(scope="module")
def tiny_sparse(tiny_llama):
    backbone = load_backbone(tiny_llama)
    model = SparseModel(backbone, load_lm_head(tiny_llama, backbone)).eval()
    return model


def padded(sequences, pad_id=0, side="right"):
    length = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, sequence in enumerate(sequences):
        place = slice(0, len(sequence)) if side == "right" else slice(length - len(sequence), length)
        ids[row, place] = torch.tensor(sequence)
        mask[row, place] = 1
    return ids, mask


def test_splade_weights_match_a_hand_reference_and_packed_pooling():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 4, 6, generator=generator)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]])
    expected = torch.zeros(3, 6)
    for b in range(3):
        for v in range(6):
            values = [float(torch.log1p(torch.relu(logits[b, t, v]))) for t in range(4) if mask[b, t]]
            expected[b, v] = max(values, default=0.0)
    got = splade_weights(logits, mask)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected)
    # the same tokens flattened with a sequence number per token (3: padding, dropped)
    sequence = torch.tensor([0, 0, 3, 3, 1, 1, 1, 1, 3, 3, 3, 3])
    torch.testing.assert_close(splade_weights_packed(logits.reshape(12, 6), sequence, 3), expected)


def test_term_weights_are_the_lm_head_over_bidirectional_states(tiny_sparse, tiny_llama):
    ids, mask = padded(SEQUENCES)
    with torch.no_grad():
        got = tiny_sparse(ids, mask)
        hidden = tiny_sparse.backbone(input_ids=ids, attention_mask=mask).last_hidden_state
    head = load_file(tiny_llama / "model.safetensors")["lm_head.weight"]
    assert tiny_sparse.width == head.shape[0] == 1024
    assert not torch.equal(head, tiny_sparse.backbone.embed_tokens.weight.detach())  # untied: its own head
    expected = torch.stack(
        [torch.log1p(torch.relu(hidden[b, : len(s)] @ head.T)).amax(dim=0) for b, s in enumerate(SEQUENCES)]
    )
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    # bidirectional: changing the last token changes what the first token contributes
    changed = [s[:-1] + [(s[-1] + 1) % 1024] for s in SEQUENCES[:1]]
    with torch.no_grad():
        states = tiny_sparse.backbone(input_ids=torch.tensor(changed)).last_hidden_state
    assert not torch.allclose(states[0, 0], hidden[0, 0], atol=1e-6)


def test_packed_and_left_padded_batches_give_the_padded_term_weights(tiny_sparse):
    ids, mask = padded(SEQUENCES)
    left_ids, left_mask = padded(SEQUENCES, side="left")
    with torch.no_grad():
        expected = tiny_sparse(padded_inputs(ids, mask))
        packed = tiny_sparse(pack_rows(SEQUENCES, capacity=9))  # several rows, sequences reordered
        left = tiny_sparse(left_ids, left_mask)
    torch.testing.assert_close(packed, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(left, expected, rtol=1e-5, atol=1e-5)


def test_packed_gradients_equal_padded(tiny_sparse):
    ids, mask = padded(SEQUENCES)
    grads = []
    for inputs in (padded_inputs(ids, mask), pack_rows(SEQUENCES, capacity=9)):
        tiny_sparse.zero_grad()
        tiny_sparse(inputs).pow(2).sum().backward()
        grads.append(tiny_sparse.lm_head.weight.grad.clone())
    tiny_sparse.zero_grad()
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-6)


def test_lm_head_ties_to_the_embeddings_when_the_checkpoint_ties_or_has_none(tiny_llama, tmp_path):
    shutil.copytree(tiny_llama, tmp_path / "tied")
    config = json.loads((tmp_path / "tied" / "config.json").read_text())
    (tmp_path / "tied" / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    backbone = load_backbone(tmp_path / "tied")
    head = load_lm_head(tmp_path / "tied", backbone)
    assert head.weight is backbone.embed_tokens.weight
    model = SparseModel(backbone, head)
    ids, mask = padded(SEQUENCES)
    model(ids, mask).sum().backward()  # the one parameter gets the head's and the embeddings' gradient
    assert backbone.embed_tokens.weight.grad is not None


def test_static_term_weights_score_the_terms_present():
    table = StaticTermWeights(6, weight=torch.arange(6.0))
    ids = torch.tensor([[1, 3, 3, 0], [5, 0, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])  # padding id 0 is no term of either query
    expected = torch.tensor([[0, 1, 0, 3, 0, 0], [0, 0, 0, 0, 0, 5]], dtype=torch.float32)
    torch.testing.assert_close(table(ids, mask), expected)


def tied_copy(tiny_llama, folder):
    shutil.copytree(tiny_llama, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    return folder


def exported(source, out, padding_side="right"):
    backbone = load_backbone(source)
    module = SparseModel(backbone, load_lm_head(source, backbone)).eval()
    settings = SparseSettings(query_length=8, document_length=12)  # the longest text is cut
    export_sparse(module, source, out, settings, policy_from_prompts("query: ", "passage: "), padding_side)
    return module


@pytest.fixture(scope="module")
def sparse_export(tiny_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("sparse") / "model"
    return exported(tiny_llama, out), out


def reference(module, tokenizer, texts, prompt, length):
    """The in-process module's weights of texts with `prompt`, cut to `length` tokens."""
    texts = [prompt + t for t in texts]
    batch = tokenizer(texts, truncation=True, max_length=length, padding=True, return_tensors="pt")
    with torch.no_grad():
        return module(batch["input_ids"], batch["attention_mask"])


@pytest.mark.parametrize("padding_side, tied", [("right", False), ("left", True)])
def test_sentence_transformers_loads_the_export_with_equal_term_weights(tiny_llama, tmp_path, padding_side, tied):
    from sentence_transformers import SparseEncoder as STSparseEncoder

    source = tied_copy(tiny_llama, tmp_path / "tied") if tied else tiny_llama
    module = exported(source, tmp_path / "model", padding_side)
    stored = load_file(tmp_path / "model" / "model.safetensors")
    assert ("lm_head.weight" in stored) is not tied  # a tied head is the embeddings, stored once
    st = STSparseEncoder(str(tmp_path / "model"), trust_remote_code=True, device="cpu")
    assert st.tokenizer.padding_side == padding_side
    tokenizer = load_tokenizer(tmp_path / "model", padding_side)
    for encode, prompt, length in ((st.encode_query, "query: ", 8), (st.encode_document, "passage: ", 12)):
        got = encode(TEXTS, convert_to_tensor=True).to_dense()
        expected = reference(module, tokenizer, TEXTS, prompt, length)
        assert float(expected.abs().max()) > 0
        torch.testing.assert_close(got, expected, rtol=RELATIVE, atol=RELATIVE * float(expected.abs().max()))


def test_embedtrain_sparse_encoder_and_encode_command_give_the_modules_weights(sparse_export, tmp_path):
    module, folder = sparse_export
    assert model_kind(folder) == "sparse"
    model = SparseEncoder.from_pretrained(folder, device="cpu")
    tokenizer = load_tokenizer(folder)
    documents = model.encode_document(TEXTS, batch_size=2)  # batches sorted by length, returned in order
    expected = reference(module, tokenizer, TEXTS, "passage: ", 12)
    np.testing.assert_allclose(documents.dense(model.width), expected.numpy(), rtol=1e-5, atol=1e-6)
    assert documents.indices.dtype == np.int64 and documents.values.dtype == np.float32
    assert mean_nonzeros(documents) == float((expected > 0).sum()) / len(TEXTS)
    queries = model.encode_query(TEXTS[:2])
    scores = model.score(TEXTS[:2], TEXTS)
    np.testing.assert_allclose(scores, queries.dense(model.width) @ documents.dense(model.width).T, rtol=1e-5)
    (tmp_path / "texts.txt").write_text("\n".join(TEXTS) + "\n")
    encode_command(folder, tmp_path / "texts.txt", tmp_path / "out.npz", prompt="document", device="cpu")
    written = read_sparse_vectors(tmp_path / "out.npz")
    for got, want in zip(written, documents):
        np.testing.assert_array_equal(got, want)


def test_inverted_index_search_equals_the_dense_product():
    generator = torch.Generator().manual_seed(0)
    documents = torch.relu(torch.randn(40, 30, generator=generator) - 1.0)
    documents[7] = 0  # a document without terms
    queries = torch.relu(torch.randn(5, 30, generator=generator) - 0.8)
    queries[:, 29] = 0.5  # a term no document has
    documents[:, 29] = 0
    expected = (queries @ documents.T).numpy()
    best = torch.topk(torch.from_numpy(expected), 6)
    for block_size, max_elements in ((1, 1), (7, 13), (65536, 2**24)):  # one entry at a time ... all at once
        index = build_index(from_dense(documents), 30, block_size=block_size)
        np.testing.assert_allclose(dot_scores(index, from_dense(queries), max_elements), expected, rtol=1e-6, atol=1e-6)
        scores, ids = search(index, from_dense(queries), 6, max_elements)
        np.testing.assert_allclose(scores, best.values.numpy(), rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(ids, best.indices.numpy())
    assert mean_nonzeros(from_dense(documents)) == float((documents > 0).sum()) / 40


@pytest.fixture(scope="module")
def inference_free_export(tiny_llama, tmp_path_factory):
    """The tiny Llama as an inference-free sparse model (a query table of unequal weights, queries
    cut at 8 tokens, documents at 12) exported in the Router layout: (module, folder)."""
    backbone = load_backbone(tiny_llama)
    table = StaticTermWeights(1024, weight=0.5 + (torch.arange(1024.0) % 7) / 3)
    module = SparseModel(backbone, load_lm_head(tiny_llama, backbone), table).eval()
    out = tmp_path_factory.mktemp("inference_free") / "model"
    settings = SparseSettings(query_length=8, document_length=12, inference_free_queries=True)
    export_sparse(module, tiny_llama, out, settings, policy_from_prompts("query: ", "passage: "))
    return module, out


def test_inference_free_export_loads_in_sentence_transformers_with_the_training_weights(
    inference_free_export, tiny_llama
):
    """sentence-transformers' SparseEncoder loads the Router layout itself; its encode_query equals
    the query vectors of a training batch (the kind's collator: the queries tokenized as its
    SparseStaticEmbedding tokenizes them, weighed by the table in the module's forward), its
    encode_document the module's document weights (relative 1e-4)."""
    from sentence_transformers import SparseEncoder as STSparseEncoder

    module, folder = inference_free_export
    assert sparse_layout(folder)[2] == folder / "query_0_SparseStaticEmbedding"
    st = STSparseEncoder(str(folder), trust_remote_code=True, device="cpu")
    config = load_config("tiny_sparse", ["model.sparse.inference_free_queries=true", "data.query_max_length=8"])
    collator = SparseKind().make_collator(load_tokenizer(tiny_llama), config, {"s": {}}, False)
    prompt = "query: "
    collator.subset_prompts = {"s": (prompt, "passage: ")}
    examples = [Example("s", text, ["a passage"]) for text in TEXTS]
    batch = collator(examples)
    with torch.no_grad():
        training = module(batch["inputs"])[: batch["num_queries"]]
    static = st[0].sub_modules["query"][0]
    features = static.preprocess(TEXTS, prompt=prompt)
    sequences, _ = collator.tokenize(examples)
    assert [row[mask.bool()].tolist() for row, mask in zip(features["input_ids"], features["attention_mask"])] == [
        list(ids) for ids in sequences
    ]
    assert max(len(ids) for ids in sequences) == 8  # the longest text is cut where sentence-transformers cuts
    got = st.encode_query(TEXTS, convert_to_tensor=True).to_dense()
    torch.testing.assert_close(got, training, rtol=RELATIVE, atol=RELATIVE * float(training.abs().max()))
    assert sorted(set(got[0].unique().tolist()) - {0.0}) != [1.0]  # the table's weights, not presence
    documents = st.encode_document(TEXTS, convert_to_tensor=True).to_dense()
    expected = reference(module, load_tokenizer(folder / "document_0_Transformer"), TEXTS, "passage: ", 12)
    torch.testing.assert_close(documents, expected, rtol=RELATIVE, atol=RELATIVE * float(expected.abs().max()))


def test_embedtrain_loads_and_evaluates_the_inference_free_export(inference_free_export, tmp_path):
    """embedtrain.SparseEncoder on the Router layout weighs queries by the table (as sentence-
    transformers does) and documents by the backbone; `embedtrain eval` runs on it and ranks by
    those vectors' dot products."""
    from test_eval import make_demo_data

    module, folder = inference_free_export
    assert model_kind(folder) == "sparse"
    model = SparseEncoder.from_pretrained(folder, device="cpu")
    assert model.settings == SparseSettings(8, 12, True)
    queries = model.encode_query(TEXTS, batch_size=2)
    tokenizer = load_tokenizer(folder / "document_0_Transformer")
    ids = tokenizer([f"query: {t}" for t in TEXTS], add_special_tokens=False, truncation=True, max_length=8)
    expected = torch.stack(
        [
            module.query_weights(torch.tensor([row]), torch.ones(1, len(row), dtype=torch.long))[0]
            for row in ids["input_ids"]
        ]
    )
    np.testing.assert_allclose(queries.dense(model.width), expected.detach().numpy(), rtol=1e-6)
    documents = model.encode_document(TEXTS)
    np.testing.assert_allclose(
        documents.dense(model.width), reference(module, tokenizer, TEXTS, "passage: ", 12).numpy(), rtol=1e-5, atol=1e-6
    )
    heldout = make_demo_data(tmp_path / "heldout", seed=1, queries=6) / "FEVER"
    found = evaluate(folder, heldout, batch_size=4, device="cpu")["subsets"]["FEVER"]
    query_ids, query_texts, corpus, doc_ids, qrels, prompt = subset_sources(heldout, model.prompt_policy)
    queries = model.encode([prompt + q for q in query_texts], is_query=True)
    docs = model.encode(next(corpus.blocks(0, len(corpus), len(corpus))))
    scores = queries.dense(model.width) @ docs.dense(model.width).T
    ids = doc_ids.to_pylist()
    rankings = {q: [ids[i] for i in np.argsort(-row, kind="stable")] for q, row in zip(query_ids, scores)}
    assert {k: found[k] for k in metrics(rankings, qrels)} == pytest.approx(metrics(rankings, qrels))
    assert found["query_nonzeros"] == pytest.approx(np.diff(queries.offsets).mean())
