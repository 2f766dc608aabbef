"""Test support shared by tests/ and benchmarks/ (an ordinary package: no path manipulation).

    data                  TEST_DATA (the real public CT test data) and REPO
    servers               in-process gRPC servers (ranking)
    peers                 real peers as subprocesses: atlasflow ingest, Orthanc, dcmtk storescu
    triton                the wheel-bundled tritonserver serving a model repository (child process)
    attention_baseline    oracle: the published attention recipe in NumPy/SciPy
    suspect_regions_numpy oracle: the enhanced suspect regions in NumPy/SciPy
    error_sim             simulated segmentation errors on the bundled label maps
    synthetic             synthetic inputs: member probability maps, a CT phantom, tiny ensembles
    stats                 statistics the error-detection benchmark reports (AUROC, Wilson, bootstrap)

Nothing in the services imports this package.
"""
