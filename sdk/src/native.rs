//! Folding with a [`Folder`] natively, no wasm: for unit tests of a reducer, and for
//! driving it with [`logq_abi::driver::Model`] like the host would.

use std::marker::PhantomData;

use logq_abi::{Fold, Folded, Record, States};

use crate::Folder;

/// A [`Fold`] that runs `F` directly.
pub struct Native<F>(PhantomData<F>);

impl<F> Default for Native<F> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

impl<F: Folder> Fold for Native<F> {
    type Error = String;

    fn fold(&self, records: &[Record<'_>], states: &dyn States) -> Result<Folded, String> {
        let batch = F::new(records);
        let mut owned: Vec<Option<Vec<u8>>> = Vec::with_capacity(batch.plan().entities.len());
        states.states(&batch.plan().entities, &mut |s| {
            owned.push(s.map(<[u8]>::to_vec))
        });
        let prior: Vec<Option<&[u8]>> = owned.iter().map(Option::as_deref).collect();
        let updates = batch.fold(&prior)?;
        Ok(Folded {
            plan: batch.plan().clone(),
            updates,
        })
    }
}

pub use logq_abi::driver::Model;
