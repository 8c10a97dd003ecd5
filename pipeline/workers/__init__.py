"""The Celery side of the pipeline: the app and its three kinds of worker.

- ``gpu``: one batch of items → draft reports → one librarian task per shard (`gpu.py`);
- ``librarian.<shard>``: one shard part → curated into the graph (`librarian.py`);
- ``query``: similarity questions answered from warm cache replicas (`query.py`).

Each task calls the same stage functions as the in-process run (`pipeline.stages`) and the
same SQL bookkeeping (`pipeline.jobs`).
"""
