"""curate: build, curate and benchmark industrial anomaly-detection datasets.

A dataset is a chain of immutable manifests (see ``curate.core.manifest``): readers under
``curate.sources`` ingest a source folder into a first manifest, stages under ``curate.stages``
each derive a new one, and exporters under ``curate.export`` write the result out.
"""

__version__ = "0.1.0"
