"""Every Redis key the batch package uses, in one place (prefix = settings.redis_prefix).

Files:   {p}:bf:{file_id}            hash  metadata (id, bytes, created_at, filename, purpose, owner, lines, chunks)
         {p}:bf:{file_id}:c          list  content chunks, each a run of whole lines (~1 MiB) (Redis content store)
         {p}:bf:{file_id}:c:{token}  list  the same while one writer appends, RENAMEd onto :c when it commits
         {p}:bf:idx:{owner}          zset  file ids of one owner, score = created_at (ms)
Batches: {p}:bb:{batch_id}           hash  record (see store.py), counters completed/failed/total/tokens
         {p}:bb:{batch_id}:res       hash  custom_id -> "o"|"e" + output line (exactly one per custom_id)
         {p}:bb:{batch_id}:fin       string finalization lease (SET NX EX), so one replica builds the output files
         {p}:bb:{batch_id}:val       string validation lease, same idea for the validating phase
         {p}:bb:{batch_id}:nat       string native forwarding lease (native.py): one replica drives the provider batch
         {p}:bb:idx:{owner}          zset  batch ids of one owner, score = created_at (ms)
         {p}:bb:aidx:{owner}         zset  the same for Anthropic Message Batches (listed apart)
         {p}:bb:active               set   batches not yet in a final state (for the sweeper and the summary)
Queue:   {p}:bq                      stream one entry per line to execute; consumer group "workers"
"""

from __future__ import annotations

GROUP = "workers"
ANON = "-"  # owner name when API keys are not required


class BatchKeys:
    def __init__(self, prefix: str) -> None:
        self.p = prefix

    def file(self, fid: str) -> str:
        return f"{self.p}:bf:{fid}"

    def chunks(self, fid: str) -> str:
        return f"{self.p}:bf:{fid}:c"

    def chunks_tmp(self, fid: str, token: str) -> str:
        return f"{self.p}:bf:{fid}:c:{token}"

    def files_of(self, owner: str | None) -> str:
        return f"{self.p}:bf:idx:{owner or ANON}"

    def batch(self, bid: str) -> str:
        return f"{self.p}:bb:{bid}"

    def results(self, bid: str) -> str:
        return f"{self.p}:bb:{bid}:res"

    def fin_lease(self, bid: str) -> str:
        return f"{self.p}:bb:{bid}:fin"

    def val_lease(self, bid: str) -> str:
        return f"{self.p}:bb:{bid}:val"

    def nat_lease(self, bid: str) -> str:
        return f"{self.p}:bb:{bid}:nat"

    def batches_of(self, owner: str | None) -> str:
        return f"{self.p}:bb:idx:{owner or ANON}"

    def msg_batches_of(self, owner: str | None) -> str:
        return f"{self.p}:bb:aidx:{owner or ANON}"

    @property
    def active(self) -> str:
        return f"{self.p}:bb:active"

    @property
    def queue(self) -> str:
        return f"{self.p}:bq"
