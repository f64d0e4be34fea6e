import sys, time, dataclasses
from benchmarks import llm_setup, section_train, workload
llm = llm_setup.load('smollm2', True)
for p in map(float, sys.argv[1:]):
    setup = llm_setup.build(llm, scan_layers=True, target_len=24)
    setup.cfg.lora.dropout = p
    from rsllm_jax.train.rsllm_setup import build_rsllm
    import rsllm_jax.train.rsllm_setup as rs
    setup.built = build_rsllm(setup.cfg, setup.mesh, num_items=workload.rec_table().shape[0], rec_table=workload.rec_table(), llm=llm)
    vocab = llm[0].vocab_size
    batch = workload.train_batch(batch=4, seq_len=384, target_len=24, vocab=vocab)
    r = section_train.run_jax(setup, batch, repeats=3, warmup=1)
    print('dropout', p, 'median step s', r['median_s'], flush=True)
