//! `--dynamic`: the model's tables as embtable dynamic tables keyed by
//! 64-bit hashes of the ids, as a production recommender keys its features:
//! no table is told how many users or items exist, rows appear as ids do,
//! and a `--capacity` bounds each table (least recently used ids go).

use embtable::dynamic::{Capacity, DynamicConfig, DynamicEmbedding, DynamicTable, Eviction};
use embtable::{Bags, EmbeddingLayer, Index, Init, Pooling, Result, SparseOptimizer};

use crate::data::Dataset;
use crate::model::{Model, ModelConfig, Tower, user_init};

/// A [`DynamicEmbedding`] whose ids are hashed (with its own salt, so the
/// item and user tables hash alike ids differently) to keys.
#[derive(Clone, Debug)]
pub struct Hashed<O> {
    layer: DynamicEmbedding<O>,
    salt: u64,
}

/// SplitMix64's finaliser of `id` and `salt`: a key as a feature hash.
fn hash(id: u64, salt: u64) -> u64 {
    let mut z = id ^ salt.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl<O: SparseOptimizer> Hashed<O> {
    /// A table of rows of `dim` floats drawn by `init` from `seed`, at most
    /// `capacity` of them, trained by `optimizer`.
    ///
    /// # Errors
    /// As [`DynamicTable::new`] and [`DynamicEmbedding::new`].
    pub fn new(
        dim: usize,
        init: Init,
        seed: u64,
        capacity: Capacity,
        optimizer: O,
        salt: u64,
    ) -> Result<Self> {
        let config = DynamicConfig {
            init,
            seed,
            capacity,
            eviction: Eviction::Lru,
            ..Default::default()
        };
        Ok(Hashed {
            layer: DynamicEmbedding::new(DynamicTable::new(dim, config)?, optimizer)?,
            salt,
        })
    }

    /// The keys of `ids`.
    fn keys<I: Index>(&self, ids: &[I]) -> Vec<u64> {
        ids.iter()
            .map(|&id| hash(id.widen() as u64, self.salt))
            .collect()
    }

    /// Bags over the keys of `bags`' ids.
    fn with_keys<I: Index, R>(&self, bags: &Bags<'_, I>, f: impl FnOnce(&Bags<'_, u64>) -> R) -> R {
        let keys = self.keys(bags.ids());
        let bags = Bags::new(&keys, bags.offsets(), bags.weights()).expect("same offsets");
        f(&bags)
    }

    /// The table.
    pub fn table(&self) -> &DynamicTable {
        self.layer.table()
    }

    /// See [`DynamicEmbedding::set_max_norm`].
    pub fn set_max_norm(&mut self, max_norm: Option<f32>) -> Result<()> {
        self.layer.set_max_norm(max_norm)
    }
}

impl<O: SparseOptimizer> EmbeddingLayer for Hashed<O> {
    fn dim(&self) -> usize {
        self.layer.dim()
    }
    fn forward_into<I: Index>(&mut self, ids: &[I], out: &mut [f32]) -> Result<()> {
        let keys = self.keys(ids);
        self.layer.forward_into(&keys, out)
    }
    fn backward<I: Index>(&mut self, ids: &[I], grad_out: &[f32]) -> Result<()> {
        let keys = self.keys(ids);
        self.layer.backward(&keys, grad_out)
    }
    fn forward_pooled<I: Index>(
        &mut self,
        bags: &Bags<'_, I>,
        pooling: Pooling,
        out: &mut [f32],
    ) -> Result<()> {
        let keys = self.keys(bags.ids());
        let bags = Bags::new(&keys, bags.offsets(), bags.weights())?;
        self.layer.forward_pooled(&bags, pooling, out)
    }
    fn backward_pooled<I: Index>(
        &mut self,
        bags: &Bags<'_, I>,
        pooling: Pooling,
        grad_out: &[f32],
    ) -> Result<()> {
        let keys = self.keys(bags.ids());
        let bags = Bags::new(&keys, bags.offsets(), bags.weights())?;
        self.layer.backward_pooled(&bags, pooling, grad_out)
    }
    fn step(&mut self) -> Result<()> {
        self.layer.step()
    }
    fn flush(&mut self) -> Result<()> {
        self.layer.flush()
    }
}

impl<O: SparseOptimizer + Clone + Send + Sync> Tower for Hashed<O> {
    /// The whole layer: its weights are the table's rows for the keys it
    /// held then.
    type Snapshot = DynamicEmbedding<O>;

    fn read(&self, ids: &[u32], out: &mut [f32]) {
        // Ids that never got a row read the default row: zeros.
        self.layer
            .lookup(&self.keys(ids), out)
            .expect("the output fits the ids");
    }

    fn read_mean(&self, bags: &Bags<'_, u32>) -> Vec<f32> {
        let mut out = vec![0.0; bags.len() * self.layer.dim()];
        self.with_keys(bags, |bags| {
            self.table().pooled_lookup(bags, Pooling::Mean, &mut out)
        })
        .expect("the output fits the bags");
        out
    }

    fn snapshot(&self) -> DynamicEmbedding<O> {
        self.layer.clone()
    }

    fn restore(&mut self, layer: DynamicEmbedding<O>) {
        self.layer = layer;
    }

    fn summary(&self) -> Option<String> {
        let (t, s) = (self.table(), self.table().stats());
        Some(format!(
            "{} ids hold a row ({} admitted, {} evicted); {:.1} MiB",
            t.len(),
            s.admitted,
            s.evicted,
            t.memory().bounded() as f64 / (1 << 20) as f64
        ))
    }
}

impl<O: SparseOptimizer + Clone + Send + Sync> Model<Hashed<O>> {
    /// A model for `data` whose tables are dynamic: rows for the hashes of
    /// the item and user ids, created as the ids arrive, at most `capacity`
    /// each; no table is told how many items or users there are.
    ///
    /// # Errors
    /// As [`Hashed::new`].
    pub fn new_dynamic(
        data: &Dataset,
        cfg: ModelConfig,
        make_optimizer: impl Fn() -> O,
        seed: u64,
        capacity: Capacity,
    ) -> Result<Self> {
        let init = Init::Normal {
            mean: 0.0,
            std: cfg.init_std,
        };
        let mut items = Hashed::new(cfg.dim, init, seed, capacity, make_optimizer(), 1)?;
        let user = user_init(&cfg);
        let mut users = Hashed::new(cfg.dim, user, seed ^ 0x5eed, capacity, make_optimizer(), 2)?;
        items.set_max_norm(cfg.max_norm)?;
        users.set_max_norm(cfg.max_norm)?;
        Ok(Model::from_layers(data, items, users, cfg))
    }
}
