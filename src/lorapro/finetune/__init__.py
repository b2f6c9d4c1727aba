"""``lorapro train``: typed config (:mod:`.config`), data (:mod:`.data`), methods (:mod:`.methods`), the Trainer
wiring (:mod:`.runner`) and what the user sees (:mod:`.reporting`). Needs the ``train`` extra."""
