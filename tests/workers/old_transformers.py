"""Run under another transformers (PYTHONPATH set by the test): load an exported folder with
trust_remote_code=True, check bidirectionality, print JSON. An embedding model (AutoModel): its
mean-pooled embeddings. A reranker (--reranker, AutoModelForSequenceClassification): the logits of
(query, passage) pairs rendered with its pair template, with right and left padding, and whether its
chat template (what sentence-transformers renders a pair with) gives the same tokens.

    PYTHONPATH=/path/to/transformers-4.51 python tests/workers/old_transformers.py MODEL TEXT...
    PYTHONPATH=/path/to/transformers-4.51 python tests/workers/old_transformers.py --reranker MODEL Q1 P1 Q2 P2...
"""

import json
import sys
from pathlib import Path

import torch
import transformers
from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer


@torch.no_grad()
def is_bidirectional(backbone):
    ids = torch.randint(0, backbone.config.vocab_size, (1, 8), generator=torch.Generator().manual_seed(0))
    changed = ids.clone()
    changed[0, -1] = (changed[0, -1] + 1) % backbone.config.vocab_size
    first = backbone(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state[0, 0]
    first_changed = backbone(input_ids=changed, attention_mask=torch.ones_like(ids)).last_hidden_state[0, 0]
    return not torch.allclose(first, first_changed)


@torch.no_grad()
def embeddings(folder, texts):
    model = AutoModel.from_pretrained(folder, trust_remote_code=True, torch_dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    vectors = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    return {"bidirectional": is_bidirectional(model), "embeddings": vectors.tolist()}


@torch.no_grad()
def reranker_logits(folder, strings):
    model = AutoModelForSequenceClassification.from_pretrained(
        folder, trust_remote_code=True, torch_dtype=torch.float32
    ).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    metadata = json.loads((Path(folder) / "embedtrain.json").read_text())
    pairs = list(zip(strings[0::2], strings[1::2]))
    texts = [metadata["pair_template"].format(query=q, passage=p) for q, p in pairs]
    logits = {}
    for side in ("right", "left"):
        tokenizer.padding_side = side
        batch = tokenizer(
            texts, truncation=True, max_length=metadata["pair_max_length"], padding=True, return_tensors="pt"
        )
        assert bool((batch["attention_mask"][:, 0 if side == "left" else -1] == 0).any()), "no padding on " + side
        logits[side] = model(**batch).logits[:, 0].tolist()
    rendered = [
        tokenizer.apply_chat_template(
            [{"role": "query", "content": q}, {"role": "document", "content": p}], tokenize=False
        )
        for q, p in pairs
    ]
    same_tokens = tokenizer(rendered, add_special_tokens=False)["input_ids"] == tokenizer(texts)["input_ids"]
    return {"bidirectional": is_bidirectional(model.model), "logits": logits, "chat_template_tokens_equal": same_tokens}


if sys.argv[1] == "--reranker":
    result = reranker_logits(sys.argv[2], sys.argv[3:])
else:
    result = embeddings(sys.argv[1], sys.argv[2:])
print(json.dumps({"transformers": transformers.__version__, **result}))
