"""The weights and what gives them their meaning, read and written the same way by every program: the export
format (one safetensors file or shards with an index, the run config beside them: files), turning a checkpoint
into an export and loading one (export: nbp-export, nbp-sample, the converters of official/, train.init_from),
and a run's identity (identity: WEIGHT_KEYS, the settings the weights were trained for, and what makes a resume
the same experiment). It stands on the model and the runtime and imports no trainer."""
