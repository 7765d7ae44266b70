"""Multi-rank ZeRO-3 training on CPU (gloo): trains, partitions, checkpoints, exports exactly."""

import json

import numpy as np
import torch
from transformers import AutoModel, AutoTokenizer

from conftest import run_worker
from embedtrain.export import export_checkpoint
from embedtrain.model.encoder import attention_is_bidirectional
from embedtrain.model.pooling import pool


def embed_with_transformers(folder, texts):
    """What a user does with the exported folder: stock transformers + the shipped modeling file."""
    model = AutoModel.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    config = json.loads((folder / "config.json").read_text())
    return torch.nn.functional.normalize(pool(hidden, batch["attention_mask"], config["pooling"]), dim=-1), model


def test_two_rank_zero3_trains_partitions_checkpoints_and_exports(tmp_path):
    run = tmp_path / "run"
    result, _ = run_worker("train_and_embed.py", tmp_path / "r.json", "--run-dir", run, nproc=2, timeout=400)
    assert result["world"] == 2 and result["partitioned"]
    assert all(np.isfinite(result["losses"]))
    checkpoints = run / "checkpoints"
    assert (checkpoints / "latest").read_text().strip() == "step_4"
    for step in ("step_2", "step_4"):
        for rank in (0, 1):
            assert (checkpoints / step / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").is_file()
        assert (checkpoints / step / "base_model" / "config.json").is_file()
    assert (run / "config.yaml").is_file() and any((run / "tb").iterdir())

    out = export_checkpoint(run, tmp_path / "exported")
    # the streaming consolidation equals DeepSpeed's own, tensor for tensor
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from safetensors.torch import load_file

    reference = get_fp32_state_dict_from_zero_checkpoint(str(checkpoints), tag="step_4")
    streamed = load_file(str(out / "model.safetensors"))
    assert streamed.keys() == {k[len("backbone.") :] for k in reference}
    assert all(torch.equal(streamed[k[len("backbone.") :]], v) for k, v in reference.items())
    exported, model = embed_with_transformers(out, result["texts"])
    torch.testing.assert_close(exported, torch.tensor(result["embeddings"]), rtol=1e-5, atol=1e-5)
    assert attention_is_bidirectional(model)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama_bidirec" and config["architectures"] == ["LlamaBidirectionalModel"]
    assert config["auto_map"]["AutoModel"] == "llama_bidirectional_model.LlamaBidirectionalModel"
    assert config["pooling"] == "avg" and config["temperature"] == 0.05
    tokenizer_config = json.loads((out / "tokenizer_config.json").read_text())
    assert tokenizer_config["padding_side"] == "right" and tokenizer_config["pad_token"] == "<|end_of_text|>"
