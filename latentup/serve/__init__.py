"""The hosted API (Runware ``upscale``, model ``runware:502@1``) on your own machine.

``tasks`` is the one task core (parse -> validate -> run -> encode) shared by ``infer.py task=`` and the server;
``python -m latentup.serve`` runs the server (``app``: transports, ``service``: task handling, ``batcher``: the
queue in front of the model, ``store``: outputs, ``sessions``: resumable WebSocket sessions, ``fetch``: allowed URLs).
"""
