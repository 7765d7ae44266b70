"""Run under another transformers (PYTHONPATH set by the test): load an exported folder with
AutoModel(trust_remote_code=True), check bidirectionality, print mean-pooled embeddings as JSON.

    PYTHONPATH=/path/to/transformers-4.51 python tests/workers/old_transformers.py MODEL TEXT...
"""

import json
import sys

import torch
import transformers
from transformers import AutoModel, AutoTokenizer

folder, texts = sys.argv[1], sys.argv[2:]
model = AutoModel.from_pretrained(folder, trust_remote_code=True, torch_dtype=torch.float32).eval()
tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
ids = torch.randint(0, model.config.vocab_size, (1, 8), generator=torch.Generator().manual_seed(0))
changed = ids.clone()
changed[0, -1] = (changed[0, -1] + 1) % model.config.vocab_size
with torch.no_grad():
    first = model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state[0, 0]
    first_changed = model(input_ids=changed, attention_mask=torch.ones_like(ids)).last_hidden_state[0, 0]
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    hidden = model(**batch).last_hidden_state
mask = batch["attention_mask"].unsqueeze(-1).float()
embeddings = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
print(
    json.dumps(
        {
            "transformers": transformers.__version__,
            "bidirectional": not torch.allclose(first, first_changed),
            "embeddings": embeddings.tolist(),
        }
    )
)
