//! The emulator harness itself: it starts, the AWS SDK reaches it, and a
//! reset empties it.

mod common;

use common::Emulator;

#[tokio::test]
async fn the_sdk_reaches_every_service_stackwarden_uses() {
    let emu = Emulator::get();
    let _guard = emu.lock().await;
    let config = emu.sdk_config().await;

    let cfn = aws_sdk_cloudformation::Client::new(&config);
    let stacks = cfn.describe_stacks().send().await.expect("DescribeStacks");
    assert!(stacks.stacks().is_empty());

    let ecs = aws_sdk_ecs::Client::new(&config);
    ecs.create_cluster()
        .cluster_name("smoke")
        .send()
        .await
        .expect("CreateCluster");
    let clusters = ecs.list_clusters().send().await.expect("ListClusters");
    assert_eq!(clusters.cluster_arns().len(), 1);

    let sns = aws_sdk_sns::Client::new(&config);
    sns.list_topics().send().await.expect("ListTopics");

    let sts = aws_sdk_sts::Client::new(&config);
    let me = sts
        .get_caller_identity()
        .send()
        .await
        .expect("GetCallerIdentity");
    assert_eq!(me.account(), Some(common::ACCOUNT));
}

#[tokio::test]
async fn reset_forgets_everything() {
    let emu = Emulator::get();
    let _guard = emu.lock().await;
    let config = emu.sdk_config().await;
    let ecs = aws_sdk_ecs::Client::new(&config);
    ecs.create_cluster()
        .cluster_name("before-reset")
        .send()
        .await
        .expect("CreateCluster");
    emu.reset();
    let clusters = ecs.list_clusters().send().await.expect("ListClusters");
    assert!(clusters.cluster_arns().is_empty());
}
