"""Data-parallel evaluation: a 2-rank run of the eval recipe under ``tune run --nproc_per_node 2``
(gloo) equals the 1-rank run, metric for metric and file row for row; the pieces that make it so
(lm-eval's padding copies served once, per-rank documents merged back in one-process order) hold on
their own."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from lm_eval.api.instance import Instance
from omegaconf import OmegaConf

from entropy_guided_generation.eleuther_eval import SUMMARY_FILENAME, EleutherEvalRecipeDirect
from entropy_guided_generation.eval.distributed import DataParallelLM, in_document_order, rank_results_in_document_order, split_padding

REPO = Path(__file__).resolve().parents[1]
TUNE = str(Path(sys.executable).parent / "tune")


def instance(doc_id: int, repeats: int = 1) -> Instance:
    return Instance("generate_until", doc={}, arguments=(f"q{doc_id}", {}), idx=0, repeats=repeats, metadata=("t", doc_id, repeats))


def test_padding_copies_get_their_originals_response_without_being_served():
    a, b, c = instance(0), instance(1, repeats=2), instance(2)
    requests = [a, b, b, c, c, c]  # lm-eval pads a short rank with copies of its last request
    served, source, padded = split_padding(requests)
    assert served == [a, b, b, c] and source == [0, 1, 2, 3, 3, 3] and padded == [c]

    class Echo(DataParallelLM):
        calls: list = []

        def generate_until(self, requests):
            return self.serve_once(requests, lambda reqs: self.calls.append(len(reqs)) or [r.args[0] for r in reqs])

    lm = Echo()
    lm.join_ranks()
    assert lm.generate_until(requests) == ["q0", "q1", "q1", "q2", "q2", "q2"] and Echo.calls == [4]
    for request, response in zip(requests, lm.generate_until(requests)):
        request.resps.append(response)  # what lm-eval's evaluator does with every response
    lm.barrier()  # lm-eval's next call: the padding copies' responses are gone
    assert [len(r.resps) for r in (a, b, c)] == [1, 2, 1]


def test_ranks_documents_merge_back_in_one_process_order():
    """lm-eval gives rank r documents r, r + W, ...; per filter, samples and metric values come back
    in document order, whatever W and however uneven the split."""
    docs, filters = range(7), ["strict", "flexible"]
    one_process_samples = [{"doc_id": d, "filter": f} for f in filters for d in docs]
    one_process_metrics = {("acc", f): [10 * d for d in docs] for f in filters}
    for world in (2, 3):
        samples = [{"t": [s for s in one_process_samples if s["doc_id"] % world == r]} for r in range(world)]
        metrics = [{"t": {k: [v for d, v in zip(docs, vs) if d % world == r] for k, vs in one_process_metrics.items()}} for r in range(world)]
        assert in_document_order(samples) == {"t": one_process_samples}
        assert in_document_order(metrics) == {"t": one_process_metrics}
    assert rank_results_in_document_order([[0, 2, 4], [1, 3]]) == [0, 1, 2, 3, 4]
    assert in_document_order([1, 2]) is None  # any other shape: left to the caller


def rows(folder: Path, prefix: str) -> dict:
    """``{task: [json row, ...]}`` of the ``<prefix>_<task>_<date>.jsonl`` files in ``folder``."""
    found = {}
    for path in sorted(folder.glob(f"{prefix}_*.jsonl")):
        task = path.name[len(prefix) + 1 :].rsplit("_", 1)[0]
        found[task] = [json.loads(line) for line in path.read_text().splitlines()]
    return found


@pytest.mark.slow
def test_two_rank_eval_equals_the_one_rank_run(tmp_path, subprocess_env):
    """limit 3 on 2 ranks: rank 0 gets documents 0 and 2, rank 1 document 1 plus lm-eval's padding.
    batch_size 1, so that no request's numbers depend on its batch-mates (in one process as in two).
    On the kit's mixed-format base with edges that spread its entropies, so that the traces' bins vary
    (on a near-uniform model every bin is the same and equal traces would say little)."""
    from entropy_guided_generation.kit.train_base import mixed_format_base

    edges = "[0.001,0.003,0.01,0.03,0.1,0.2,0.4,0.7,1.0,1.5]"
    overrides = ["limit=3", "batch_size=1", "max_gen_toks=8", "bootstrap_iters=10", f"checkpointer.checkpoint_dir={mixed_format_base('sequential')}",
                 "confidence.edges.scheme=explicit", f"confidence.edges.values={edges}"]
    one, two = tmp_path / "one", tmp_path / "two"
    cfg = OmegaConf.merge(OmegaConf.load(REPO / "configs/tiny/eval_answer.yaml"), OmegaConf.from_dotlist([*overrides, f"output_dir={one}"]))
    recipe = EleutherEvalRecipeDirect(cfg)
    recipe.setup(cfg)
    recipe.evaluate()
    command = [TUNE, "run", "--nproc_per_node", "2", "recipes/eleuther_eval.py", "--config", "configs/tiny/eval_answer.yaml", *overrides, f"output_dir={two}"]
    done = subprocess.run(command, cwd=REPO, env=subprocess_env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]

    results = [json.loads(next(folder.glob("results_*.json")).read_text()) for folder in (one, two)]
    assert len(list(two.glob("results_*.json"))) == 1  # written once, by rank 0
    assert results[1]["results"] == results[0]["results"]  # every metric, bootstrap stderr included
    assert results[1]["n-samples"] == results[0]["n-samples"]
    assert results[1]["confidence_calibration"] == results[0]["confidence_calibration"]
    for prefix in ("samples", "confidence_traces"):
        assert rows(two, prefix) == rows(one, prefix) and len(rows(one, prefix)) == 3
    bins = {b for trace in rows(one, "confidence_traces")["kit_gsm8k"] for b in trace["bins"] if b >= 0}
    assert len(bins) >= 3, bins
    assert rows(one, "samples")["kit_arith_choice"][1]["doc_id"] == 1
    summaries = [json.loads((folder / SUMMARY_FILENAME).read_text()) for folder in (one, two)]
    assert summaries[1]["decode_tokens"] == summaries[0]["decode_tokens"] > 0
    assert summaries[1]["calibration"] == summaries[0]["calibration"]
