//! Fencing: every state write of an active period carries the epoch of the execution lease it
//! holds, and changes nothing once another instance took the lease over (the lease's rules are
//! in the lease module, above this layer). A write checks it either in its own statement (`fenced!`) or, in a
//! transaction, just before it commits ([`Fence::check`]). Either way the check takes a shared
//! lock on the lease row, so a takeover waits for writes in progress.

use sqlx::{MySqlConnection, MySqlTransaction};

/// The epoch of one holding, checked by every state write of that active period.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Fence {
    name: String,
    epoch: u64,
}

/// A write was refused: another instance holds the lease now.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "fenced: this instance's execution lease (epoch {ours}) was taken over (epoch now {current:?})"
)]
pub(crate) struct Fenced {
    pub ours: u64,
    pub current: Option<u64>,
}

/// Why a write did not happen.
#[derive(Debug, thiserror::Error)]
pub(crate) enum StoreError {
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    #[error(transparent)]
    Fenced(#[from] Fenced),
    /// The write was grouped with others whose writer was cancelled before it answered: it
    /// may or may not have committed. Transient: written again, it changes nothing twice.
    #[error(
        "the group this write went with was abandoned by its cancelled writer before it answered"
    )]
    Abandoned,
}

impl Fence {
    /// The fence of the lease row `name` (the lease's name for an `AMQP_PREFIX`) held with
    /// `epoch`.
    pub(crate) fn new(name: String, epoch: u64) -> Self {
        Self { name, epoch }
    }

    /// Commits `tx` if the lease still has this epoch; otherwise rolls it back and returns
    /// [`StoreError::Fenced`]. Every fenced transaction ends this way.
    pub(crate) async fn commit(&self, mut tx: MySqlTransaction<'_>) -> Result<(), StoreError> {
        match self.check(&mut tx).await {
            Ok(()) => Ok(tx.commit().await?),
            Err(e) => {
                tx.rollback().await?;
                Err(e)
            }
        }
    }

    pub(crate) fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The lease row's name.
    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    /// Inside the caller's transaction, just before it commits: [`StoreError::Fenced`] when
    /// the lease now has another epoch (the caller must roll back). The shared lock it takes
    /// makes a takeover wait until this transaction ends.
    pub(crate) async fn check(&self, tx: &mut MySqlConnection) -> Result<(), StoreError> {
        let current = super::lease::epoch_shared(tx, &self.name).await?;
        if current == Some(self.epoch) {
            Ok(())
        } else {
            Err(Fenced {
                ours: self.epoch,
                current,
            }
            .into())
        }
    }
}
