"""OpenRLHF custom reward function that scores with rmserve, batching OpenRLHF's per-sample calls.

    --reward.remote_url $(python -c "import rmserve.client.openrlhf as m; print(m.__file__)")

OpenRLHF (v0.11.0, openrlhf/utils/agent.py:193-200, 303-320) loads this file and calls
`reward_func(queries, prompts, labels)` once per sample (lists of one), from threads
(`asyncio.to_thread`) of every vLLM engine actor. Here the calls of one process are coalesced, on
a background event loop, into one POST /get_reward with `"on_error": "report"` in the body, so the
service parses the chat-templated queries and the labels (its `/get_reward` rules) and reports
each sample's error.
Requests are retried on 429/5xx and timeouts, honouring Retry-After.

Environment: RMSERVE_URL (default http://127.0.0.1:8000), RMSERVE_MODEL (default: the service's
RMSERVE_OPENRLHF_MODEL), RMSERVE_API_KEY (sent as a Bearer token), RMSERVE_ON_ERROR: `raise`
(default: the sample's call raises ItemFailed; OpenRLHF 0.11.2 catches it, logs it at INFO and
leaves the sample without a reward, so the step fails later) or a number (the sample gets it, with
`extra_logs["rmserve_error"]` 1). A label the service refuses (422 naming `labels[i]`) raises
RewardServiceError in that sample's call only (the other samples are sent again); a request that
fails for good (service down, unknown model) raises it in every call of the batch, whatever
RMSERVE_ON_ERROR says.
"""

from __future__ import annotations

from rmserve.client.openrlhf_scoring import reset, reward_func

__all__ = ["reset", "reward_func"]
