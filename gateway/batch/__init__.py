"""OpenAI-compatible Files and Batch APIs executed on spare fleet capacity, durable in Redis.

files.py stores uploads (chunked, streamed; metadata in Redis, contents in content.py's Redis or directory store),
validate.py checks JSONL lines, store.py keeps batch records and results, worker.py claims lines from a Redis
Stream and runs them through an injected executor, service.py ties the lifecycle together (validating ->
in_progress -> finalizing -> completed | failed | expired, cancelling -> cancelled); native.py instead forwards a
pool's batches to a hosted provider's own Batch API when configured. Redis key names live in keys.py only.
"""
