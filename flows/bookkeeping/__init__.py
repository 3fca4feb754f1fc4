"""The MLflow bookkeeping of pipeline runs, one module per job: open or reopen a pipeline run's
MLflow run and mark its stages (``pipeline_run``), record a finished stage from its files
(``record_stage``), catch up with what the files hold and end stopped runs (``sync``), end a run
truthfully (``run_end``); the logged model (``logged_model``), where a run ran (``provenance``)
and the store itself (``store``). Results are written before any of it: a store that fails loses
no work."""
