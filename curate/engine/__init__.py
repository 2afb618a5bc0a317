"""Running stages: the content-addressed artifact store and the workspace that holds manifests,
the stage protocol with its cache, the executors (inline, process pool, Ray) and verification."""
