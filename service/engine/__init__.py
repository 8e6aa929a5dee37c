"""The engine (one per worker): ``Engine`` (pipeline.py) over a ``Model`` (model.py), with
``Explanations``, ``Listings`` and the ``MicroBatcher``. Transport-free."""
