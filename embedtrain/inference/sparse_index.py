"""Sparse vectors of many texts held in CSR form, written to `.npz`, and searched exactly by dot
product through an inverted index.

A collection of N texts' sparse vectors is `SparseVectors(indices, values, offsets)`: `indices`
(int64 vocabulary ids) and `values` (float32 weights) of every text's non-zero terms end to end, and
`offsets` (N + 1, int64): text i owns entries offsets[i]:offsets[i+1] (the format `embedtrain
encode` writes for a sparse model; numpy.savez, uncompressed).

The API, in the order a retrieval uses it:

    index = build_index(corpus_vectors, width)       # term -> (document ids, weights), exact
    scores, ids = search(index, query_vectors, 10)   # (Q, k) float32 dot products, (Q, k) int64 rows
    dot_scores(index, query_vectors)                 # (Q, N) all the dot products (small corpora)
    mean_nonzeros(vectors)                           # the mean count of non-zero terms per text

`build_index` fills the inverted index (the corpus' CSC: per vocabulary term, the documents that have
it, in increasing order, with their weights) in two passes over the CSR entries, `block_size`
documents at a time, so that its temporaries stay one block's while the index itself is the
corpus' non-zeros (12 bytes each), never documents x vocabulary. `search` scores a block of queries
at a time term by term (for each query term, its weight times the term's postings, added to the
documents' accumulators), with at most `max_elements` postings gathered at once and a (queries x
documents) float32 accumulator per block; the result equals the product of the densified matrices
up to float32 summation order.
"""

from typing import NamedTuple

import numpy as np
import torch

MAX_ELEMENTS = 2**24  # postings gathered at once, and accumulator cells per query block (64 MiB of fp32)


class SparseVectors(NamedTuple):
    """N sparse vectors in CSR form: text i owns indices[offsets[i]:offsets[i+1]] (int64 term ids,
    increasing within a text) and the same slice of values (float32)."""

    indices: np.ndarray
    values: np.ndarray
    offsets: np.ndarray

    @property
    def count(self):
        """The number of texts."""
        return len(self.offsets) - 1

    def row(self, i):
        """(term ids, weights) of text i."""
        part = slice(int(self.offsets[i]), int(self.offsets[i + 1]))
        return self.indices[part], self.values[part]

    def dense(self, width):
        """The (N, width) float32 matrix (tests, small collections)."""
        out = np.zeros((self.count, width), np.float32)
        rows = np.repeat(np.arange(self.count), np.diff(self.offsets))
        out[rows, self.indices] = self.values
        return out


def from_dense(weights):
    """SparseVectors of the non-zero entries of a (N, V) tensor or array (row-major, so each text's
    term ids increase)."""
    weights = torch.as_tensor(weights).float().cpu()
    rows, terms = weights.nonzero(as_tuple=True)
    offsets = np.zeros(weights.shape[0] + 1, np.int64)
    offsets[1:] = np.cumsum(np.bincount(rows.numpy(), minlength=weights.shape[0]))
    return SparseVectors(terms.numpy().astype(np.int64), weights[rows, terms].numpy(), offsets)


def concatenate(parts):
    """One SparseVectors of several, in order."""
    parts = list(parts)
    if not parts:
        return SparseVectors(np.zeros(0, np.int64), np.zeros(0, np.float32), np.zeros(1, np.int64))
    starts = np.cumsum([0] + [int(p.offsets[-1]) for p in parts[:-1]])
    offsets = np.concatenate([[0]] + [p.offsets[1:] - p.offsets[0] + s for p, s in zip(parts, starts)])
    return SparseVectors(
        np.concatenate([p.indices[p.offsets[0] : p.offsets[-1]] for p in parts]).astype(np.int64),
        np.concatenate([p.values[p.offsets[0] : p.offsets[-1]] for p in parts]).astype(np.float32),
        offsets.astype(np.int64),
    )


def mean_nonzeros(vectors):
    """The mean number of non-zero terms per text (0.0 for no texts)."""
    return float(vectors.offsets[-1] - vectors.offsets[0]) / vectors.count if vectors.count else 0.0


def write_sparse_vectors(path, vectors):
    """Write SparseVectors as `.npz`: indices (int64), values (float32), offsets (int64)."""
    with open(path, "wb") as f:  # a file object: numpy appends no ".npz" to the name
        np.savez(
            f,
            indices=np.asarray(vectors.indices, np.int64),
            values=np.asarray(vectors.values, np.float32),
            offsets=np.asarray(vectors.offsets, np.int64),
        )


def read_sparse_vectors(path):
    """SparseVectors of a `.npz` written by write_sparse_vectors, checked."""
    with np.load(path) as data:
        if not {"indices", "values", "offsets"} <= set(data.files):
            raise ValueError(f"{path}: not a sparse-vector file (needs the arrays 'indices', 'values' and 'offsets')")
        vectors = SparseVectors(data["indices"], data["values"], data["offsets"])
    offsets = vectors.offsets
    if (
        offsets.ndim != 1
        or len(offsets) < 1
        or offsets[0] != 0
        or offsets[-1] != len(vectors.indices)
        or len(vectors.values) != len(vectors.indices)
        or np.any(np.diff(offsets) < 0)
    ):
        raise ValueError(f"{path}: offsets do not cut the {len(vectors.indices)} entries into texts")
    return vectors


class SparseIndex(NamedTuple):
    """An inverted index over N documents: term t's postings are doc_ids[term_offsets[t]:
    term_offsets[t+1]] (int64, increasing) with the same slice of weights (float32)."""

    term_offsets: np.ndarray
    doc_ids: np.ndarray
    weights: np.ndarray
    num_documents: int

    @property
    def width(self):
        return len(self.term_offsets) - 1


def build_index(documents, width=None, block_size=65536):
    """The inverted index of `documents` (SparseVectors) over a vocabulary of `width` terms (default:
    the largest term id + 1), filled `block_size` documents at a time (module docstring)."""
    indices, values, offsets = documents.indices, documents.values, documents.offsets
    nnz = int(offsets[-1] - offsets[0])
    if width is None:
        width = int(indices[offsets[0] : offsets[-1]].max()) + 1 if nnz else 0
    counts = np.zeros(width, np.int64)
    for start in range(0, documents.count, block_size):  # pass 1: postings per term
        part = slice(int(offsets[start]), int(offsets[min(start + block_size, documents.count)]))
        if np.any(indices[part] >= width) or np.any(indices[part] < 0):
            raise ValueError(f"sparse index: a term id lies outside the vocabulary of {width} terms")
        counts += np.bincount(indices[part], minlength=width)
    term_offsets = np.zeros(width + 1, np.int64)
    np.cumsum(counts, out=term_offsets[1:])
    doc_ids = np.empty(nnz, np.int64)
    weights = np.empty(nnz, np.float32)
    cursor = term_offsets[:-1].copy()  # where each term's next posting goes
    for start in range(0, documents.count, block_size):  # pass 2: the postings, in document order
        stop = min(start + block_size, documents.count)
        part = slice(int(offsets[start]), int(offsets[stop]))
        terms = indices[part]
        docs = np.repeat(np.arange(start, stop, dtype=np.int64), np.diff(offsets[start : stop + 1]))
        order = np.argsort(terms, kind="stable")  # by term, then (stable) by document
        terms, docs, block_values = terms[order], docs[order], values[part][order]
        first = np.searchsorted(terms, terms, side="left")  # each entry's rank among its term's in the block
        places = cursor[terms] + (np.arange(len(terms)) - first)
        doc_ids[places], weights[places] = docs, block_values
        cursor += np.bincount(terms, minlength=width)
    return SparseIndex(term_offsets, doc_ids, weights, documents.count)


def query_postings(index, queries, start, stop):
    """(query rows, their term weights, posting start, posting length) of every non-zero term of
    queries start..stop, rows counted from `start`."""
    part = slice(int(queries.offsets[start]), int(queries.offsets[stop]))
    rows = np.repeat(np.arange(stop - start, dtype=np.int64), np.diff(queries.offsets[start : stop + 1]))
    terms = queries.indices[part]
    known = terms < index.width  # a term no document has contributes nothing
    rows, terms, weights = rows[known], terms[known], queries.values[part][known]
    first = index.term_offsets[terms]
    return rows, weights, first, index.term_offsets[terms + 1] - first


def accumulate(index, queries, start, stop, max_elements=MAX_ELEMENTS):
    """(stop - start, N) float32 dot products of queries start..stop with every document, term at a
    time, at most `max_elements` postings gathered at once."""
    scores = torch.zeros((stop - start) * index.num_documents, dtype=torch.float32)
    rows, weights, first, lengths = query_postings(index, queries, start, stop)
    doc_ids, posting_weights = torch.from_numpy(index.doc_ids), torch.from_numpy(index.weights)
    ends = np.cumsum(lengths)
    pair = 0
    while pair < len(rows):  # the next run of (query, term) pairs whose postings fit max_elements
        done = ends[pair - 1] if pair else 0
        last = max(pair + 1, int(np.searchsorted(ends, done + max_elements, side="right")))
        chunk = slice(pair, last)
        counts = lengths[chunk]
        total = int(counts.sum())
        if total:
            # the positions of every gathered posting: each pair's range first..first+length
            within = np.arange(total) - np.repeat(np.cumsum(counts) - counts, counts)
            positions = torch.from_numpy(np.repeat(first[chunk], counts) + within)
            contribution = torch.from_numpy(np.repeat(weights[chunk], counts)) * posting_weights[positions]
            target = torch.from_numpy(np.repeat(rows[chunk], counts)) * index.num_documents + doc_ids[positions]
            scores.index_add_(0, target, contribution)
        pair = last
    return scores.view(stop - start, index.num_documents)


def query_block(index, max_elements):
    """Queries scored at once: their (queries x documents) accumulator stays under max_elements cells."""
    return max(1, max_elements // max(1, index.num_documents))


def dot_scores(index, queries, max_elements=MAX_ELEMENTS):
    """(Q, N) float32 numpy: every query's dot product with every document of the index."""
    out = np.zeros((queries.count, index.num_documents), np.float32)
    step = query_block(index, max_elements)
    for start in range(0, queries.count, step):
        stop = min(start + step, queries.count)
        out[start:stop] = accumulate(index, queries, start, stop, max_elements).numpy()
    return out


def search(index, queries, top_k=10, max_elements=MAX_ELEMENTS):
    """Exact top-k by dot product: (scores (Q, k) float32, document rows (Q, k) int64), best first,
    k = min(top_k, N). `queries`: SparseVectors over the index's vocabulary."""
    k = min(top_k, index.num_documents)
    scores = np.zeros((queries.count, k), np.float32)
    ids = np.zeros((queries.count, k), np.int64)
    step = query_block(index, max_elements)
    for start in range(0, queries.count, step):
        stop = min(start + step, queries.count)
        best = torch.topk(accumulate(index, queries, start, stop, max_elements), k, dim=1)
        scores[start:stop], ids[start:stop] = best.values.numpy(), best.indices.numpy()
    return scores, ids
