//! The test control plane starts and its controller-manager works: garbage collection and
//! namespace deletion are both done by kube-controller-manager.

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::api::{Api, DeleteParams, PostParams};
use kube::{Resource, ResourceExt};
use serde::de::DeserializeOwned;
use support::controlplane::ControlPlane;

const NAMESPACE: &str = "garbage";
const GONE_TIMEOUT: Duration = Duration::from_secs(90);

#[tokio::test]
async fn control_plane_serves_api_and_collects_garbage() -> Result<()> {
    let control_plane = ControlPlane::start().await?;
    assert!(control_plane.server_url().starts_with("https://127.0.0.1:"));
    assert!(control_plane.kubeconfig_path().is_file());
    let client = control_plane.client();

    let namespaces = Api::<Namespace>::all(client.clone());
    let namespace = Namespace {
        metadata: meta(NAMESPACE, None),
        ..Default::default()
    };
    namespaces
        .create(&PostParams::default(), &namespace)
        .await?;

    let config_maps = Api::<ConfigMap>::namespaced(client.clone(), NAMESPACE);
    let owner = config_maps
        .create(&PostParams::default(), &config_map("owner", None))
        .await?;
    let owner_reference = OwnerReference {
        api_version: ConfigMap::api_version(&()).into_owned(),
        kind: ConfigMap::kind(&()).into_owned(),
        name: owner.name_any(),
        uid: owner.uid().context("the created owner has no uid")?,
        ..Default::default()
    };
    let dependent = config_map("dependent", Some(owner_reference));
    config_maps
        .create(&PostParams::default(), &dependent)
        .await?;

    config_maps
        .delete("owner", &DeleteParams::background())
        .await?;
    wait_until_gone(&config_maps, "dependent").await?;

    namespaces
        .delete(NAMESPACE, &DeleteParams::default())
        .await?;
    wait_until_gone(&namespaces, NAMESPACE).await?;
    Ok(())
}

fn meta(name: &str, owner: Option<OwnerReference>) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.to_string()),
        owner_references: owner.map(|owner| vec![owner]),
        ..Default::default()
    }
}

fn config_map(name: &str, owner: Option<OwnerReference>) -> ConfigMap {
    ConfigMap {
        metadata: meta(name, owner),
        data: Some(BTreeMap::from([("key".to_string(), "value".to_string())])),
        ..Default::default()
    }
}

async fn wait_until_gone<K>(api: &Api<K>, name: &str) -> Result<()>
where
    K: Clone + DeserializeOwned + std::fmt::Debug,
{
    let deadline = tokio::time::Instant::now() + GONE_TIMEOUT;
    while api.get_opt(name).await?.is_some() {
        if tokio::time::Instant::now() >= deadline {
            bail!("{name} still exists after {GONE_TIMEOUT:?}");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    Ok(())
}
