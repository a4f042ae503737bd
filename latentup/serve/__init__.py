"""The hosted API (Runware ``upscale``, model ``runware:502@1``) on your own machine.

``tasks`` is the one task core (parse -> validate -> run -> encode) shared by ``infer.py task=`` and the server;
``python -m latentup.serve`` runs the server (``app``: transports, ``service``: task handling, ``batcher``: the
queue in front of the model, ``store``: uploads and outputs, ``records``: taskUUIDs, ``sessions``: resumable
WebSocket sessions, ``limits``: what a task may cost, ``fetch``: allowed URLs, ``wire``: the JSON that goes out).
With ``redis_url`` many replicas share one Redis: ``redis_link`` (clients, channels), ``redis_records``,
``redis_store``, ``redis_sessions`` (shared records, store and sessions), ``redis_queue`` (the task stream, the
accepting side) and ``redis_worker`` (the model worker that reads it).
"""
