"""ownlm: your conversations become your personal language model, on your machine.

The map, by loop stage (tests/test_layout.py keeps it true):

src/ownlm/                     each stage imports only the stages above it and the shared bottom
  errors.py settings.py fsutil.py device.py basemodel.py
                 the shared bottom: user-facing errors with hints, the settings class, crash-safe private
                 files, CPU/CUDA selection, the base model (resolve, fingerprint, load, cache)
  bitdelta/      1-bit deltas, pure maths + file format: pack · quant · lora1 · dense · distill · format · apply
                 (below learn and node: training reads adapters with it, the node checks deltas with it)
  artifact/      manifest · sign · seal · bundle; imports bitdelta (below store: the store keeps the keys)
  capture/       importers/: one module per export format, parsing only (no store)
  store/         SQLCipher: migrations, users/tokens, conversations, imports (an importer's result into the
                 store), datasets, models and the files derived from a user's data, jobs, redact (secrets and
                 PII out), memory (the FTS5 index of passages, BM25 recall); imports capture, artifact
  learn/         dataset (merkle, augment, paraphrase) → tokens → batching → train (steps, dp: DP-SGD with Opacus) ·
                 continual · worker; imports store, bitdelta
  engine/        the inference protocol, the torch engine, the personal engine, the llama.cpp engine and its
                 replicas, routing (hot deploy), serving (which engine serves), memory (recalled passages into the
                 system prompt);
                 imports bitdelta
  evaluate/      metrics · habits · general · report · run · gate · personas/; imports learn, engine, artifact
  node/          install: verify → open → install → route, rollback, prune, recover; export (gguf-lora, peft,
                 ollama); merge (`ownlm merge`: peft's add_weighted_adapter → SVD to rank → lora1 → sign → install);
                 imports store, artifact, engine, evaluate
  privacy/       tiers · remote · trainer · attest · checkpoints (a trainer's sealed resumable checkpoints) · federation (Flower
                 rounds across a person's devices: fedupdate = signed updates and their checks, aggregate = the pure
                 maths) · secure_agg (tier 3: CKKS sums, pairwise masks) · securefed (tier-3 rounds: the
                 person's key on each device, encrypted updates, decrypting the sum) · community (the opt-in
                 community model: DP + masked contributions, its aggregator, the shared starting adapter); imports
                 node, evaluate, learn, store
  cluster/       rounds as Ray tasks (optional extra, imported only with cluster.ray_address): connect · agent (the
                 trainer role on each Ray node) · placement (tiers decide the node) · round; imports privacy, node
  loop.py        the scheduled round: learn → gate → bundle → node, one process owning each job
  api/           FastAPI app: OpenAI routes, personalization, memory (per request and per user), models, loop,
                 /ws/chat, dashboard, trainer_app
  demo.py        `ownlm demo`          cli/   one module per command group (base.py: what they share)
"""

__version__ = "0.1.0"
