"""Metadata XML: every generated file writes its elements in the metadata schema's order."""

from __future__ import annotations

import io
import xml.etree.ElementTree as ET
import zipfile

from instruqt_crm.crm import salesforce_setup
from instruqt_crm.mapping import load_mapping

MAPPING = load_mapping("mappings/salesforce.yaml")
NO_PLAYS = MAPPING.model_copy(
    update={"salesforce": MAPPING.salesforce.model_copy(update={"plays": None})}
)


def parse(content: bytes) -> ET.Element:
    return ET.fromstring(content)


# The element order of Salesforce's metadata schema: the Metadata API WSDL (metadata.wsdl,
# Setup > API > Generate Metadata WSDL; the Metadata API Developer Guide lists the same fields),
# API 62.0. Every type extends `Metadata`, whose only element, fullName, comes first.
SCHEMA = {
    "CustomField": (
        "fullName",
        *("businessOwnerGroup", "businessOwnerUser", "businessStatus", "caseSensitive"),
        *("complianceGroup", "customDataType", "defaultValue", "deleteConstraint", "deprecated"),
        *("description", "displayFormat", "elementType", "encryptionScheme", "escapeMarkup"),
        *("externalDeveloperName", "externalId", "fieldManageability", "formula"),
        *("formulaTreatBlanksAs", "inlineHelpText", "isAIPredictionField"),
        *("isConvertLeadDisabled", "isFilteringDisabled", "isNameField", "isSortingDisabled"),
        *("label", "length", "lookupFilter", "maskChar", "maskType"),
        *("metadataRelationshipControllingField", "mktDataLakeFieldAttributes"),
        *("mktDataModelFieldAttributes", "populateExistingRows", "precision"),
        *("referenceTargetField", "referenceTo", "relationshipLabel", "relationshipName"),
        *("relationshipOrder", "reparentableMasterDetail", "required", "restrictedAdminField"),
        *("scale", "securityClassification", "startingNumber", "stripMarkup", "summarizedField"),
        *("summaryFilterItems", "summaryForeignKey", "summaryOperation", "trackFeedHistory"),
        *("trackHistory", "trackTrending", "translateData", "type", "unique", "valueSet"),
        *("visibleLines", "writeRequiresMasterRead"),
    ),
    "CustomObject": (
        "fullName",
        *("actionOverrides", "allowInChatterGroups", "articleTypeChannelDisplay"),
        *("businessProcesses", "compactLayoutAssignment", "compactLayouts", "customHelp"),
        *("customHelpPage", "customSettingsType", "deploymentStatus", "deprecated"),
        *("description", "enableActivities", "enableBulkApi", "enableDataTranslation"),
        *("enableDivisions", "enableEnhancedLookup", "enableFeeds", "enableHistory"),
        *("enableLicensing", "enablePublishStatusTracking", "enableReports", "enableSearch"),
        *("enableSharing", "enableStreamingApi", "eventType", "externalDataSource"),
        *("externalName", "externalRepository", "externalSharingModel", "fieldSets", "fields"),
        *("gender", "historyRetentionPolicy", "household", "indexes", "label", "listViews"),
        *("mktDataLakeAttributes", "mktDataModelAttributes", "nameField", "pluralLabel"),
        *("profileSearchLayouts", "publishBehavior", "recordTypeTrackFeedHistory"),
        *("recordTypeTrackHistory", "recordTypes", "searchLayouts", "sharingModel"),
        *("sharingReasons", "sharingRecalculations", "startsWith", "validationRules"),
        *("visibility", "webLinks"),
    ),
    "CustomValue": ("fullName", "color", "default", "description", "isActive", "label"),
    "ValueSet": (
        *("controllingField", "restricted", "valueSetDefinition", "valueSetName"),
        "valueSettings",
    ),
    "ValueSetValuesDefinition": ("sorted", "value"),
    "PermissionSet": (
        "fullName",
        *("agentAccesses", "applicationVisibilities", "classAccesses"),
        *("customMetadataTypeAccesses", "customPermissions", "customSettingAccesses"),
        *("description", "emailRoutingAddressAccesses", "externalCredentialPrincipalAccesses"),
        *("externalDataSourceAccesses", "fieldPermissions", "flowAccesses"),
        *("genComputingSummaryDefAccesses", "hasActivationRequired", "label", "license"),
        *("objectPermissions", "pageAccesses", "recordTypeVisibilities"),
        *("servicePresenceStatusAccesses", "tabSettings", "userPermissions"),
    ),
    "PermissionSetFieldPermissions": ("editable", "field", "readable"),
    "PermissionSetObjectPermissions": (
        *("allowCreate", "allowDelete", "allowEdit", "allowRead", "modifyAllRecords"),
        *("object", "viewAllFields", "viewAllRecords"),
    ),
    "PermissionSetUserPermission": ("enabled", "name"),
    "Package": (
        "fullName",
        *("apiAccessLevel", "description", "namespacePrefix", "objectPermissions"),
        *("packageType", "postInstallClass", "setupWeblink", "types", "uninstallClass"),
        "version",
    ),
    "PackageTypeMembers": ("members", "name"),
}
NESTED = {  # (type, element) -> the element's type
    ("CustomObject", "fields"): "CustomField",
    ("CustomObject", "nameField"): "CustomField",
    ("CustomField", "valueSet"): "ValueSet",
    ("ValueSet", "valueSetDefinition"): "ValueSetValuesDefinition",
    ("ValueSetValuesDefinition", "value"): "CustomValue",
    ("PermissionSet", "fieldPermissions"): "PermissionSetFieldPermissions",
    ("PermissionSet", "objectPermissions"): "PermissionSetObjectPermissions",
    ("PermissionSet", "userPermissions"): "PermissionSetUserPermission",
    ("Package", "types"): "PackageTypeMembers",
}


def out_of_order(node: ET.Element, kind: str, where: str) -> list[str]:
    """Where ``node`` (of schema type ``kind``) and its descendants break the schema's order."""
    order = SCHEMA[kind]
    tags = [child.tag.split("}")[1] for child in node]
    problems = [f"{where}: <{tag}> is not an element of {kind}" for tag in tags if tag not in order]
    ranks = [order.index(tag) for tag in tags if tag in order]
    if ranks != sorted(ranks):
        problems.append(f"{where}: {tags} is not in {kind}'s order")
    for child in node:
        tag = child.tag.split("}")[1]
        if (kind, tag) in NESTED:
            problems += out_of_order(child, NESTED[kind, tag], f"{where}/{tag}")
        elif len(child):
            problems.append(f"{where}/{tag}: nested elements of an unknown type")
    return problems


def every_metadata_file() -> dict[str, bytes]:
    """Every XML file of the sfdx project and of the Metadata API zip, with and without plays."""
    files = {}
    for mapping in (MAPPING, NO_PLAYS, MAPPING.model_copy(update={"object": "Contact"})):
        files |= {p: c for p, c in salesforce_setup.package(mapping).items() if p.endswith(".xml")}
        archive = zipfile.ZipFile(io.BytesIO(salesforce_setup.mdapi_zip(mapping)))
        files |= {f"zip:{n}": archive.read(n) for n in archive.namelist()}
    return files


def test_every_metadata_file_follows_the_schemas_order() -> None:
    files = every_metadata_file()
    assert len(files) > 30
    problems = []
    for path, content in files.items():
        root = parse(content)
        problems += out_of_order(root, root.tag.split("}")[1], path)
    assert problems == []
    field_files = [c for p, c in files.items() if p.endswith(".field-meta.xml")]
    assert {parse(c)[0].tag.split("}")[1] for c in field_files} == {"fullName"}


def test_the_order_check_finds_a_misplaced_element() -> None:
    old = (  # as this package wrote fields before: sorted by tag, fullName among the others
        f'<CustomField xmlns="{salesforce_setup.NS}"><description>d</description>'
        "<externalId>false</externalId><fullName>A__c</fullName><label>A</label></CustomField>"
    )
    assert out_of_order(ET.fromstring(old), "CustomField", "old") == [
        "old: ['description', 'externalId', 'fullName', 'label'] is not in CustomField's order"
    ]
    unknown = f'<Package xmlns="{salesforce_setup.NS}"><version>62.0</version><nope/></Package>'
    assert out_of_order(ET.fromstring(unknown), "Package", "p") == [
        "p: <nope> is not an element of Package"
    ]
