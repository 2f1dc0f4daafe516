//! Which appliance a database belongs to. Appliances share the database server, each with a
//! database of its own; the first daemon to start on a database records its `AMQP_PREFIX` and
//! `HOST_VM_ID` there, and a daemon of another appliance refuses to start on it (two
//! appliances on one database would share operations, mappings and the execution lease).

use schema::VmId;
use sqlx::MySqlPool;

/// An appliance's identity as its settings give it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Appliance {
    pub prefix: String,
    /// `HOST_VM_ID`; unset when the host VM comes from `ossea_configs` (of this database).
    pub host_vm: Option<VmId>,
}

/// The database is another appliance's.
#[derive(Debug, thiserror::Error)]
#[error(
    "the database {database} belongs to another appliance: it was set up by AMQP_PREFIX={theirs_prefix:?} with HOST_VM_ID={theirs_host}, this daemon has AMQP_PREFIX={mine_prefix:?} with HOST_VM_ID={mine_host}; give each appliance a database of its own (DATABASE_URL)"
)]
pub struct ForeignDatabase {
    pub database: String,
    pub theirs_prefix: String,
    pub theirs_host: String,
    pub mine_prefix: String,
    pub mine_host: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ClaimError {
    #[error(transparent)]
    Foreign(#[from] ForeignDatabase),
    #[error("reading or recording the database's appliance: {0}")]
    Sql(#[from] sqlx::Error),
}

/// Records `me` as the database's appliance if it has none, and checks it otherwise: the
/// prefix must be the same, and so must the host VM when both name one (a recorded appliance
/// without a host VM gets `me`'s).
pub(crate) async fn claim(pool: &MySqlPool, me: &Appliance) -> Result<(), ClaimError> {
    let host = me.host_vm.map(|v| v.to_string());
    sqlx::query("INSERT IGNORE INTO appliance (id, amqp_prefix, host_vm_id) VALUES (1, ?, ?)")
        .bind(&me.prefix)
        .bind(&host)
        .execute(pool)
        .await?;
    let (prefix, recorded, database): (String, Option<String>, Option<String>) =
        sqlx::query_as("SELECT amqp_prefix, host_vm_id, DATABASE() FROM appliance WHERE id = 1")
            .fetch_one(pool)
            .await?;
    let host_differs = matches!((&recorded, &host), (Some(r), Some(h)) if r != h);
    if prefix != me.prefix || host_differs {
        let shown = |v: &Option<String>| v.clone().unwrap_or_else(|| "(unset)".into());
        return Err(ForeignDatabase {
            database: database.unwrap_or_default(),
            theirs_prefix: prefix,
            theirs_host: shown(&recorded),
            mine_prefix: me.prefix.clone(),
            mine_host: shown(&host),
        }
        .into());
    }
    if recorded.is_none() && host.is_some() {
        sqlx::query("UPDATE appliance SET host_vm_id = ? WHERE id = 1 AND host_vm_id IS NULL")
            .bind(&host)
            .execute(pool)
            .await?;
    }
    Ok(())
}

/// Why the host VM was not changed.
#[derive(Debug, thiserror::Error)]
pub enum SetHostError {
    #[error(
        "a daemon holds the execution lease of this database ({holder}, until {until} UTC): stop every daemon of the appliance first, then set the host VM"
    )]
    LeaseHeld { holder: String, until: String },
    #[error(
        "the database has no appliance recorded yet: start the daemon once with the right HOST_VM_ID instead"
    )]
    Unclaimed,
    #[error("the database: {0}")]
    Sql(#[from] sqlx::Error),
}

/// Records `vm` as the appliance's host VM, in one transaction refused while a daemon of the
/// lease `lease` holds it (its expiry in the server's clock not yet passed). The host VM it
/// replaces.
pub(crate) async fn set_host_vm(
    pool: &MySqlPool,
    lease: &str,
    vm: VmId,
) -> Result<Option<String>, SetHostError> {
    let mut tx = pool.begin().await?;
    let held: Option<(String, String)> = sqlx::query_as(
        "SELECT holder, CAST(expires_at AS CHAR) FROM execution_lease \
         WHERE name = ? AND holder <> '' AND expires_at > UTC_TIMESTAMP(3) FOR UPDATE",
    )
    .bind(lease)
    .fetch_optional(&mut *tx)
    .await?;
    if let Some((holder, until)) = held {
        return Err(SetHostError::LeaseHeld { holder, until });
    }
    let old: Option<Option<String>> =
        sqlx::query_scalar("SELECT host_vm_id FROM appliance WHERE id = 1 FOR UPDATE")
            .fetch_optional(&mut *tx)
            .await?;
    let Some(old) = old else {
        return Err(SetHostError::Unclaimed);
    };
    sqlx::query("UPDATE appliance SET host_vm_id = ? WHERE id = 1")
        .bind(vm.to_string())
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(old)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::testdb::TestDb;

    fn appliance(prefix: &str, host_vm: Option<VmId>) -> Appliance {
        Appliance {
            prefix: prefix.into(),
            host_vm,
        }
    }

    #[tokio::test]
    async fn the_first_daemon_claims_the_database_and_another_appliance_is_refused() {
        let db = TestDb::new().await;
        let (vm, other_vm) = (VmId::new_random(), VmId::new_random());
        claim(&db.pool, &appliance("acc1", None))
            .await
            .expect("claimed");
        // The same appliance again (a restart, its standby), now naming its host VM.
        claim(&db.pool, &appliance("acc1", Some(vm)))
            .await
            .expect("same");
        claim(&db.pool, &appliance("acc1", Some(vm)))
            .await
            .expect("same");
        claim(&db.pool, &appliance("acc1", None))
            .await
            .expect("host VM from ossea_configs");

        for stranger in [
            appliance("acc2", Some(vm)),
            appliance("acc1", Some(other_vm)),
        ] {
            let e = claim(&db.pool, &stranger)
                .await
                .expect_err("another appliance");
            let text = e.to_string();
            assert!(matches!(e, ClaimError::Foreign(_)), "{text}");
            assert!(
                text.contains("\"acc1\"")
                    && text.contains(&vm.to_string())
                    && text.contains("DATABASE_URL"),
                "{text}"
            );
        }
        let (prefix, host): (String, Option<String>) =
            sqlx::query_as("SELECT amqp_prefix, host_vm_id FROM appliance")
                .fetch_one(&db.pool)
                .await
                .expect("row");
        assert_eq!((prefix.as_str(), host), ("acc1", Some(vm.to_string())));
    }
}
