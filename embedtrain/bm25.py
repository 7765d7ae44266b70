"""Okapi BM25 over lowercase words: a lexical first stage for `embedtrain eval --first-stage bm25`.

The scoring function (Robertson and Zaragoza, "The Probabilistic Relevance Framework: BM25 and
Beyond", Foundations and Trends in Information Retrieval 3(4), 2009, section 3.4), for a query Q and
a document D of |D| words, in a corpus of N documents of mean length avgdl:

    score(D, Q) = sum over the words t of Q of  idf(t) * tf(t, D) * (k1 + 1) / (tf(t, D) + k1 * L(D))
    L(D)        = 1 - b + b * |D| / avgdl
    idf(t)      = ln(1 + (N - df(t) + 0.5) / (df(t) + 0.5))

with k1 = 1.2 and b = 0.75 (the values Robertson and Zaragoza give as usual), tf(t, D) the count of t
in D and df(t) the number of documents holding t. The idf is the non-negative form Lucene's
BM25Similarity uses (the 1 + inside the log keeps a word in more than half the documents from
scoring below zero). A word repeated in the query counts once per occurrence (the k3 -> infinity
limit of the query-term factor). Words are `\\w+` runs of the lowercased text (Unicode letters,
digits and underscore; no stemming, no stop words), so BM25 does not depend on any model's tokenizer.

`bm25_search` reads the corpus twice, block by block (document frequencies and lengths, then the
scores), so that host memory holds the vocabulary, one length per document, the queries and their
running top-k, never the corpus.
"""

import re

import numpy as np
import torch

from embedtrain.retrieval import RunningTopK

K1, B = 1.2, 0.75
WORD = re.compile(r"\w+")
BLOCK = 4096  # documents scored at a time


def words(text):
    """The lowercase words of a text, in order."""
    return WORD.findall(text.lower())


def idf(df, n):
    """ln(1 + (N - df + 0.5) / (df + 0.5)) for numpy df."""
    df = np.asarray(df, np.float64)
    return np.log1p((n - df + 0.5) / (df + 0.5))


def term_weights(tf, length, avgdl, idf_t, k1=K1, b=B):
    """BM25's per-(word, document) weight: idf x the saturated, length-normalised term frequency."""
    tf = np.asarray(tf, np.float64)
    return idf_t * tf * (k1 + 1) / (tf + k1 * (1 - b + b * np.asarray(length, np.float64) / avgdl))


def bm25_scores(queries, documents, k1=K1, b=B):
    """(Q, P) float64 BM25 scores of query texts against a small list of document texts, in memory
    (the reference the blocked search is tested against)."""
    docs = [words(d) for d in documents]
    n, avgdl = len(docs), sum(len(d) for d in docs) / max(1, len(docs))
    df = {}
    for d in docs:
        for word in set(d):
            df[word] = df.get(word, 0) + 1
    out = np.zeros((len(queries), n))
    for i, query in enumerate(queries):
        for j, d in enumerate(docs):
            for word in words(query):
                tf = d.count(word)
                if tf:
                    out[i, j] += float(term_weights(tf, len(d), avgdl, idf(df[word], n), k1, b))
    return out


def document_terms(texts, vocabulary, grow):
    """(document index, word id, count) int64 arrays and the word counts of each text; words not in
    `vocabulary` get the next id when `grow`, else are dropped."""
    doc_index, ids, counts, lengths = [], [], [], []
    for index, text in enumerate(texts):
        found = words(text)
        lengths.append(len(found))
        tally = {}
        for word in found:
            word_id = vocabulary.get(word)
            if word_id is None and grow:
                word_id = vocabulary[word] = len(vocabulary)
            if word_id is not None:
                tally[word_id] = tally.get(word_id, 0) + 1
        doc_index += [index] * len(tally)
        ids += list(tally)
        counts += list(tally.values())
    as_array = lambda values: np.asarray(values, np.int64)  # noqa: E731
    return as_array(doc_index), as_array(ids), as_array(counts), as_array(lengths)


@torch.no_grad()
def bm25_search(query_texts, source, k, k1=K1, b=B, query_chunk=64, block=BLOCK):
    """BM25 top-k of a corpus for each query: (scores (Q, k) float32, rows (Q, k) int64), best first.

    `source`: the corpus as a retrieval text source (ParquetTexts, JsonlTexts, ListTexts; raw texts,
    no prompt), read twice in blocks of `block` documents. Every document is a candidate (a document
    sharing no word with the query scores 0), so k is cut to the corpus size only."""
    n = len(source)
    vocabulary, df, lengths = {}, np.zeros(0, np.int64), np.zeros(n, np.int64)
    for b0, texts in zip(range(0, n, block), source.blocks(0, n, block)):
        _, ids, _, block_lengths = document_terms(texts, vocabulary, grow=True)
        df = np.concatenate([df, np.zeros(len(vocabulary) - len(df), np.int64)])
        np.add.at(df, ids, 1)
        lengths[b0 : b0 + len(texts)] = block_lengths
    avgdl = max(float(lengths.mean()) if n else 0.0, 1e-9)
    idf_all = idf(df, n)
    chunks = []  # per query chunk: (its sorted word ids, (chunk, words) query counts, running top-k)
    k = min(k, n)
    for q0 in range(0, len(query_texts), query_chunk):
        chunk = query_texts[q0 : q0 + query_chunk]
        owner, ids, counts, _ = document_terms(chunk, vocabulary, grow=False)
        unique = np.unique(ids)
        matrix = np.zeros((len(chunk), len(unique)), np.float32)
        np.add.at(matrix, (owner, np.searchsorted(unique, ids)), counts)
        chunks.append((unique, torch.from_numpy(matrix), RunningTopK(len(chunk), k)))
    for b0, texts in zip(range(0, n, block), source.blocks(0, n, block)):
        doc_index, ids, counts, _ = document_terms(texts, vocabulary, grow=False)
        weights = term_weights(counts, lengths[b0 + doc_index], avgdl, idf_all[ids], k1, b).astype(np.float32)
        for unique, matrix, top in chunks:
            columns = np.minimum(np.searchsorted(unique, ids), max(0, len(unique) - 1))
            hit = unique[columns] == ids if len(unique) else np.zeros(len(ids), bool)
            doc_weights = np.zeros((len(texts), len(unique)), np.float32)
            doc_weights[doc_index[hit], columns[hit]] = weights[hit]
            top.add(matrix @ torch.from_numpy(doc_weights).T, b0)
    scores = np.full((len(query_texts), k), -np.inf, np.float32)
    rows = np.full((len(query_texts), k), -1, np.int64)
    for q0, (_, _, top) in zip(range(0, len(query_texts), query_chunk), chunks):
        part_scores, part_rows = top.result()
        scores[q0 : q0 + len(part_rows)], rows[q0 : q0 + len(part_rows)] = part_scores, part_rows
    return scores, rows
