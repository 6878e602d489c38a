"""One rank of a data-parallel training run, started by torchrun from tests/test_training_scale.py.

    torchrun --standalone --nproc_per_node=2 tests/distributed_train.py CONFIG.json

CONFIG holds the TrainConfig fields, the pairs and ``out``. Each rank trains with its own
output_dir (``out``/rank-R) so the test can see that only rank 0 writes, and reports a digest of
the weights it ended with in ``out``/rank-R.json.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from trainers.training.train import TrainConfig, train  # noqa: E402


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    out, rank = Path(spec.pop("out")), int(os.environ["RANK"])
    train_pairs, eval_pairs = spec.pop("train_pairs"), spec.pop("eval_pairs")
    res = train(TrainConfig(output_dir=str(out / f"rank-{rank}"), **spec), train_pairs, eval_pairs)
    digest = hashlib.sha256()
    for name, tensor in sorted(res.reward_model.torch_model.state_dict().items()):
        digest.update(name.encode() + tensor.detach().cpu().contiguous().numpy().tobytes())
    (out / f"rank-{rank}.json").write_text(json.dumps({"sha256": digest.hexdigest(), "metrics": res.metrics},
                                                      default=str))


if __name__ == "__main__":
    main()
